"""What each editable tensor of an open_clip CLIP multiplies: its input layout and the second
moments of its inputs over a data set (for SLUG's retain-preconditioned step, METHODS.md 1.4 and
README "The edit direction").

Kept beside the adapter rather than in it so that the base model's training stage does not depend
on this file.  Inputs are read with forward hooks on open_clip's own modules:
- `*.attn.in_proj_weight`: the query that enters the nn.MultiheadAttention (self-attention);
- `*.attn.out_proj.weight`: the attention's output before its output projection, read by running
  the attention once more with that projection set to the identity (PyTorch's nn.MultiheadAttention
  applies it inside a fused function, so no hook on `out_proj` ever fires);
- `*.weight` of an nn.Linear (`mlp.c_fc`, `mlp.c_proj`): the module's input;
- `visual.proj`, `text_projection`: the tower's pooled output with the projection taken out;
- a LayerNorm weight: its normalised input x_hat (only the diagonal E[x_hat^2] is kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.models.openclip import ClipAdapter

PROJECTIONS = ("visual.proj", "text_projection")


def input_layout(model: nn.Module, name: str) -> str:
    """How tensor `name` meets its input x: `linear` (y = x W^T: nn.Linear layers and the
    attention's in/out projections), `matmul` (y = x @ W: the towers' output projections) or
    `scale` (a LayerNorm weight, y = w * x_hat).  Any other tensor is a one-line error."""
    modules = dict(model.named_modules())
    owner, _, leaf = name.rpartition(".")
    if name in PROJECTIONS and isinstance(dict(model.named_parameters()).get(name), nn.Parameter):
        return "matmul"
    if leaf == "in_proj_weight" and isinstance(modules.get(owner), nn.MultiheadAttention):
        return "linear"
    if leaf == "weight" and isinstance(modules.get(owner), nn.Linear):
        return "linear"
    if leaf == "weight" and isinstance(modules.get(owner), nn.LayerNorm):
        return "scale"
    raise UnlearnError(f"no input statistics for tensor {name!r} (not a linear layer, attention projection, tower projection "
                       "or LayerNorm weight); set slug.search.direction=gradient to edit it")


@torch.no_grad()
def input_moments(adapter: ClipAdapter, layers: list[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
    """The second moments of the input x that each tensor in `layers` multiplies, over every
    position (token) of every pair in `batches` ((images, tokens)): E[x x^T] (float64) for a
    matrix, E[x_hat^2] for a LayerNorm weight.  A tower runs only when one of its tensors is
    asked for.  Returns the moments and the number of pairs."""
    model = adapter.model
    modules = dict(model.named_modules())
    layouts = {name: input_layout(model, name) for name in layers}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = (x * x).sum(0) if layouts[name] == "scale" else x.T @ x
        sums[name] = sums[name] + m if name in sums else m
        rows[name] = rows.get(name, 0) + x.shape[0]

    handles = []
    for name in layers:
        layout, (owner, _, leaf) = layouts[name], name.rpartition(".")
        if layout == "matmul":
            continue  # read from the tower's output with the projection taken out, below
        module = modules[owner]
        parent = modules.get(owner.rpartition(".")[0])
        if leaf == "in_proj_weight":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: add(name, args[0] if args else kwargs["query"]), with_kwargs=True))
        elif isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
            handles.append(parent.register_forward_pre_hook(_attention_output_hook(name, add), with_kwargs=True))
        elif layout == "scale":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: add(name, nn.functional.layer_norm(args[0], m.normalized_shape, eps=m.eps))))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: add(name, args[0])))
    towers = {adapter.tower(n) for n in layers}
    count = 0
    try:
        for images, tokens in batches:
            if "image" in towers:
                with _without_param(model.visual, "proj", "visual.proj" in layers):
                    out = model.visual(images.to(adapter.device))
                if "visual.proj" in layers:
                    add("visual.proj", out[0] if isinstance(out, tuple) else out)
            if "text" in towers:
                with _without_param(model, "text_projection", "text_projection" in layers):
                    out = model.encode_text(tokens.to(adapter.device))
                if "text_projection" in layers:
                    add("text_projection", out)
            count += images.shape[0]
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise UnlearnError("the retain set is empty: no input statistics for the preconditioned step")
    return {n: sums[n] / rows[n] for n in layers}, count


@contextlib.contextmanager
def _without_param(module: nn.Module, name: str, active: bool = True) -> Iterator[None]:
    """Temporarily drop a registered parameter (open_clip then skips the projection it holds)."""
    if not active:
        yield
        return
    saved = module._parameters[name]
    module._parameters[name] = None
    try:
        yield
    finally:
        module._parameters[name] = saved


def _attention_output_hook(name: str, add: Any) -> Any:
    """A forward pre-hook for an nn.MultiheadAttention that records the input of its output
    projection: it runs the attention once more with that projection set to the identity."""
    busy = [False]

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        if busy[0]:
            return
        weight, bias = module.out_proj.weight, module.out_proj.bias
        saved = weight.data, None if bias is None else bias.data
        busy[0] = True
        try:
            weight.data = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
            if bias is not None:
                bias.data = torch.zeros_like(bias.data)
            out = module(*args, **kwargs)
        finally:
            weight.data = saved[0]
            if bias is not None:
                bias.data = saved[1]
            busy[0] = False
        add(name, out[0] if isinstance(out, tuple) else out)

    return hook
