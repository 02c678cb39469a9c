"""Diffusion unlearning methods for the UnlearnCanvas benchmark, one file each, registered by
name: SLUG (slug.py, the text-encoder edit of `sd_unlearn`), ESD-x (esd.py), SalUn (salun.py),
UCE (uce.py) and concept ablation (ca.py).  `methods()` finds them; `run_method(name, ctx,
params)` unlearns `ctx.pipe` in place for `ctx.target` and returns a `Result`.

A method is one file here that decorates its `run(ctx, cfg) -> Result` with
`@register(name, ConfigDataclass, summary)`; its config is its own section of params.yaml
(`unlearncanvas.<name>`), unknown or missing keys being one-line errors.  Shared rules
(docs/unlearncanvas.md "UnlearnCanvas"):
- a method edits the pipeline in place and returns the tensors it changed (`Result.changed`,
  what it would have to ship: their safetensors size is its storage);
- the time the stage reports is the wall time of `run` (SalUn's mask included), nothing else;
- a loss that turns NaN or inf raises `Diverged`: the stage records the row as failed.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unlearn.errors import UnlearnError
from unlearn.methods.registry import Diverged  # noqa: F401  (the CLIP baselines' own: one error for a diverged loss)
from unlearn.params import as_config


@dataclass
class Result:
    # pipeline tensor name ("unet.<name>", "text_encoder.<name>") -> its new value; or, with "<name>:rows" beside it (the indices
    # of the rows that changed, `unlearn.methods.slug.ROWS_SUFFIX`), the new value of those rows only (an embedding table's edit)
    changed: dict[str, torch.Tensor]
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a method gets: the pipeline (edited in place) and its frozen copy of the UNet, the
    target, the prompts, real images of the target's cells (`forget`) and of the others
    (`retain`, uint8 `unlearn.sd.data.Images`), the sampler, and for SLUG its CLIP side
    (`slug`: an `unlearn.sd.methods.slug.SlugInputs`)."""

    pipe: object
    target: object                 # unlearn.sd.unlearn.Target
    templates: object              # unlearn.sd.data.Templates
    forget: object                 # Images
    retain: object                 # Images
    sample: object                 # unlearn.sd.evaluate.SampleConfig
    size: int
    validation_seed: int           # the seeds of decisions made on drawings (SLUG's search); never the answer set's
    judges: object = None
    slug: object = None


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[dict, str], object]
    run: Callable[[Context, object], Result]
    summary: str


_METHODS: dict[str, Method] = {}
_DISCOVERED = False


def register(name: str, config: type, summary: str) -> Callable:
    def wrap(run):
        if name in _METHODS and _METHODS[name].run is not run:
            raise RuntimeError(f"diffusion method {name!r} is registered twice")
        _METHODS[name] = Method(name, lambda values, key: as_config(config, values, key), run, summary)
        return run

    return wrap


def methods() -> dict[str, Method]:
    global _DISCOVERED
    if not _DISCOVERED:
        import unlearn.sd.methods as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "common":
                importlib.import_module(f"{package.__name__}.{info.name}")
        _DISCOVERED = True
    return dict(sorted(_METHODS.items()))


def check_methods(names: list, key: str) -> list[str]:
    known = methods()
    if not names:
        raise UnlearnError(f"{key} is empty; list methods from: {', '.join(known)}")
    for n in names:
        if str(n) not in known:
            raise UnlearnError(f"{key} names an unknown method {n!r}; known: {', '.join(known)}")
    if len(set(map(str, names))) != len(names):
        raise UnlearnError(f"{key} names a method twice: {', '.join(map(str, names))}")
    return [str(n) for n in names]


def run_method(name: str, ctx: Context, params: dict, key: str) -> Result:
    method = methods()[check_methods([name], key)[0]]
    return method.run(ctx, method.config(dict(params), f"{key}.{name}"))


def apply_changed(pipe, path) -> list[str]:
    """Load a method's saved tensors (models/unlearncanvas/<method>/<target>.safetensors) into a
    base pipeline in place: the one call that makes it that unlearned pipeline (a tensor saved by
    rows, `Result`, sets those rows).  A file that does
    not read as safetensors (missing, truncated), a tensor holding NaN or inf, or one the pipeline
    lacks or of another shape (a file for another pipeline) is a one-line error, before any
    weight of the pipeline changes."""
    import safetensors
    import safetensors.torch

    fix = "re-run the unlearncanvas stage of that method (`dvc repro unlearncanvas`)"
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as e:
        raise UnlearnError(f"{path} does not read as safetensors ({type(e).__name__}: {e}); {fix}") from None
    from unlearn.methods.slug import ROWS_SUFFIX

    targets = {}
    for name, value in tensors.items():
        if name.endswith(ROWS_SUFFIX):
            continue
        part, _, rest = name.partition(".")
        params = dict(getattr(pipe, part).named_parameters()) if getattr(pipe, part, None) is not None else {}
        rows = tensors.get(name + ROWS_SUFFIX)
        shape = (len(rows), *params[rest].shape[1:]) if rows is not None and rest in params else None
        if rest not in params or tuple(value.shape) != (shape or tuple(params[rest].shape)):
            raise UnlearnError(f"{path} sets {name} {list(value.shape)}, which this pipeline lacks; apply it to the pipeline it was made from")
        if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64 or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < params[rest].shape[0])):
            raise UnlearnError(f"{path}: the rows of {name} are not indices of its {params[rest].shape[0]} rows; {fix}")
        if not torch.isfinite(value).all():
            raise UnlearnError(f"{path}: {name} holds NaN or inf; {fix}")
        targets[name] = (params[rest], value, rows)
    orphans = [n for n in tensors if n.endswith(ROWS_SUFFIX) and n.removesuffix(ROWS_SUFFIX) not in tensors]
    if orphans:
        raise UnlearnError(f"{path} holds {orphans[0]} without the rows it indexes; {fix}")
    with torch.no_grad():
        for param, value, rows in targets.values():
            if rows is None:
                param.copy_(value.to(param))
            else:
                param[rows] = value.to(param)
    return sorted(n for n in tensors if not n.endswith(ROWS_SUFFIX))


def config_of(name: str, params: dict, key: str) -> dict:
    """The method's config as a dict (recorded in the metrics)."""
    method = methods()[name]
    return dataclasses.asdict(method.config(dict(params), f"{key}.{name}"))
