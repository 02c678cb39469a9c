"""SLUG: Single Layer Unlearning Gradient (docs/methods.md, "SLUG").

One gradient pass at the base weights gives g_f = grad L_f (forget) and g_r = grad L_r (retain);
layers are ranked by importance ||g_f,l|| / ||theta_l|| and gradient alignment
|cos(g_f,l, g_r,l)|; the Pareto front of (low alignment, high importance) holds the candidates;
a step-size search edits one candidate along a direction d_l:

    theta_l(rho) = theta_l + rho * ||theta_l|| * d_l / ||d_l||

d_l = g_f,l in the paper (`direction: gradient`); by default g_f,l preconditioned by the second
moments of the layer's inputs on the retain set (`direction: retain_preconditioned`, see
`precondition`), the edit with the same first-order rise of L_f that moves the retain outputs least.

Sign convention: stored gradients are +grad L_f, so the edit direction always *increases* the
forget loss (pushes each forget image away from its own caption).

g_r and the retain input moments depend on no concept: they are computed once per (model, retain
set) (`unlearn.methods.retain_stats`, stage `retain_stats`) and every concept reads them, so a
concept pays for its forget gradient, the ranking and the search only.

The sequence is written once: `forget_gradient` -> `rank` -> `search` (directions, step
search, the chosen edit) -> `apply_edit`.  The DVC stages run these one per stage with files in
between; `unlearn` runs them in one process (the comparison).  Everything talks to the model
through the adapter protocol (`unlearn.models.adapter`), so it runs on every model family.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from unlearn.data.curate import KINDS
from unlearn.errors import UnlearnError
from unlearn.eval.suite import ACCURACY_KEYS, OTHER_KIND
from unlearn.io import read_hashed_tensors, save_safetensors, sha256_file, write_json
from unlearn.methods import check_direction, check_fallback
from unlearn.methods.registry import Context, Outcome, chunks, register, utility_score
from unlearn.methods.retain_stats import RetainStats, compute_retain_stats
from unlearn.models.adapter import Adapter, check_made_for, fingerprint, read_family
from unlearn.models.gradients import mean_gradient

# a step's input moments: per tensor, or a function giving them for the tensors asked (the kept moments)
Moments = dict[str, torch.Tensor] | Callable[[list[str]], dict[str, torch.Tensor]]
SIGN_CONVENTION = "+grad L_f: the stored forget gradient points to higher forget loss; the edit adds it"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the one gradient pass

@dataclass(frozen=True)
class GradientRecord:
    """The sidecar of a forget-gradient file: what it was computed from and how (the retain
    gradient lives with the retain statistics, `unlearn.methods.retain_stats`)."""

    model_sha256: str
    forget_manifest_sha256: str
    n_forget: int
    batch_size: int
    seed: int
    forget_loss: float
    family: str = "open_clip"
    sign_convention: str = SIGN_CONVENTION
    forget_loss_def: str = "mean over D_f of 1 - cos(v_i, t_i), each image with its own caption"


def save_gradients(directory: Path, forget: dict[str, torch.Tensor], record: GradientRecord) -> None:
    meta = {"sign_convention": SIGN_CONVENTION, "model_sha256": record.model_sha256, "family": record.family}
    save_safetensors(forget, directory / "forget.safetensors", metadata=meta)
    write_json(directory / "sidecar.json", asdict(record) | {"forget_sha256": sha256_file(directory / "forget.safetensors")})


def load_gradients(directory: str | Path, adapter: Adapter, model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The forget gradient checked against the model: the file's hash, the sidecar's model hash,
    the tensor names and shapes, and finiteness.  Any mismatch is a one-line error."""
    directory = Path(directory)
    path, fix = directory / "forget.safetensors", "re-run the gradients stage"
    sidecar, tensors = read_hashed_tensors(directory, "sidecar.json", (path.name,), lambda s: {path.name: s.get("forget_sha256")}, "gradients", fix,
                                           f"{fix} (check the data for corrupt images)")
    if sidecar.get("sign_convention") != SIGN_CONVENTION:
        raise UnlearnError(f"{directory / 'sidecar.json'} has sign convention {sidecar.get('sign_convention')!r}, expected +grad L_f; recompute the gradients")
    check_made_for(f"gradients in {directory}", sidecar, model_dir, fix)
    shapes = {n: tuple(p.shape) for n, p in adapter.model.named_parameters()}
    grads = tensors[path.name]
    if set(grads) != set(shapes):
        extra, lacking = sorted(set(grads) - set(shapes)), sorted(set(shapes) - set(grads))
        raise UnlearnError(f"{path} does not match the model's tensors (unknown {extra[:3]}, missing {lacking[:3]}); re-run the gradients stage")
    for n, g in grads.items():
        if tuple(g.shape) != shapes[n]:
            raise UnlearnError(f"{path}: {n} has shape {tuple(g.shape)}, the model's is {shapes[n]}; re-run the gradients stage")
    return grads, sidecar


# ---------------------------------------------------------------- layer ranking

@dataclass(frozen=True)
class LayerScore:
    name: str
    tower: str
    importance: float        # ||g_f|| / ||theta||
    alignment: float         # |cos(g_f, g_r)|
    signed_alignment: float  # cos(g_f, g_r): > 0 means the edit (+g_f) also raises the retain loss
    weight_norm: float
    grad_norm: float
    numel: int


def layer_scores(adapter: Adapter, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor], candidates: Sequence[str]) -> list[LayerScore]:
    params = dict(adapter.model.named_parameters())
    out = []
    for name in candidates:
        w, gf, gr = params[name].detach().double().flatten().cpu(), forget[name].double().flatten(), retain[name].double().flatten()
        wn, gfn, grn = float(w.norm()), float(gf.norm()), float(gr.norm())
        cos = float(gf @ gr) / (gfn * grn) if gfn > 0 and grn > 0 else 0.0
        out.append(LayerScore(name, adapter.tower(name), gfn / wn if wn > 0 else 0.0, abs(cos), cos, wn, gfn, w.numel()))
    return out


def pareto_front(importance: Sequence[float], alignment: Sequence[float]) -> list[int]:
    """Indices of the non-dominated layers, by importance descending.  Layer i is dominated if
    some j has alignment_j < alignment_i and importance_j > importance_i.  O(n log n)."""
    order = sorted(range(len(importance)), key=lambda i: alignment[i])
    front: list[int] = []
    best_before = -math.inf  # highest importance among strictly smaller alignments
    k = 0
    while k < len(order):
        j = k
        while j < len(order) and alignment[order[j]] == alignment[order[k]]:
            j += 1
        group = order[k:j]
        front.extend(i for i in group if not importance[i] < best_before)
        best_before = max(best_before, max(importance[i] for i in group))
        k = j
    return sorted(front, key=lambda i: -importance[i])


def pareto_ranks(importance: Sequence[float], alignment: Sequence[float]) -> list[int]:
    """Non-dominated sorting: rank 1 is the Pareto front, rank 2 the front of the rest, ..."""
    ranks = [0] * len(importance)
    left = list(range(len(importance)))
    rank = 1
    while left:
        front = pareto_front([importance[i] for i in left], [alignment[i] for i in left])
        for k in front:
            ranks[left[k]] = rank
        chosen = {left[k] for k in front}
        left = [i for i in left if i not in chosen]
        rank += 1
    return ranks


ALIGNMENTS = ("abs", "signed")


@dataclass(frozen=True)
class Ranking:
    """Per tower: a row per candidate (scores, Pareto rank), the front, and the search order
    (Pareto rank, then importance)."""

    rows: dict[str, list[dict]]
    fronts: dict[str, list[str]]
    order: dict[str, list[str]]
    alignment: str

    def front_scores(self) -> dict[str, dict[str, dict[str, float]]]:
        by_name = {r["layer"]: r for rows in self.rows.values() for r in rows}
        return {t: {n: {k: round(by_name[n][k], 8) for k in ("importance", "alignment", "signed_alignment")} for n in names}
                for t, names in self.fronts.items()}


def rank_towers(scores: Sequence[LayerScore], towers: Sequence[str], alignment: str = "abs") -> Ranking:
    """Pareto ranking per tower (one tower or several, in the order given).  alignment "abs"
    ranks by |cos(g_f, g_r)| (the paper); "signed" by max(cos, 0): an edit anti-aligned with g_r
    lowers the retain loss, so it counts as separated."""
    if alignment not in ALIGNMENTS:
        raise UnlearnError(f"unknown slug.rank.alignment {alignment!r}; use one of: {', '.join(ALIGNMENTS)}")
    if not towers:
        raise UnlearnError("no tower to rank: slug.rank.towers is empty")
    rows, fronts, order = {}, {}, {}
    for t in towers:
        tower = [s for s in scores if s.tower == t]
        if not tower:
            raise UnlearnError(f"the model has no candidate layer in its {t} tower")
        align = [s.alignment if alignment == "abs" else max(s.signed_alignment, 0.0) for s in tower]
        ranks = pareto_ranks([s.importance for s in tower], align)
        idx = sorted(range(len(tower)), key=lambda i: (ranks[i], -tower[i].importance))
        fronts[t] = [tower[i].name for i in idx if ranks[i] == 1]
        order[t] = [tower[i].name for i in idx]
        rows[t] = [{"layer": s.name, "importance": s.importance, "alignment": a, "signed_alignment": s.signed_alignment,
                    "front": r == 1, "pareto_rank": r, "numel": s.numel} for s, a, r in zip(tower, align, ranks)]
    return Ranking(rows, fronts, order, alignment)


def plan_layers(front_scores: dict[str, dict[str, dict[str, float]]], order: dict[str, list[str]], limit: int) -> list[str]:
    """The layers the search tries: both towers' orders interleaved, the tower whose front holds
    the most important layer first, at most `limit`."""
    towers = sorted(front_scores, key=lambda t: -max((v["importance"] for v in front_scores[t].values()), default=0.0))
    return interleave_fronts({t: order[t] for t in towers}, limit)


# ---------------------------------------------------------------- the single-layer edit

def unit_direction(grad: torch.Tensor) -> torch.Tensor:
    norm = grad.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UnlearnError("the forget gradient of the chosen layer is zero or not finite; the forget set does not reach this layer")
    return grad / norm


def edit_delta(weight: torch.Tensor, direction: torch.Tensor, rho: float) -> torch.Tensor:
    """rho * ||theta_l|| * d / ||d||: the relative step along the edit direction d (g_f itself,
    or g_f preconditioned by the retain inputs, see `step_directions`)."""
    return rho * weight.norm() * unit_direction(direction).to(weight)


def precondition(grad: torch.Tensor, moment: torch.Tensor, layout: str, damping: float) -> torch.Tensor:
    """The forget gradient of one tensor in the metric of its output change on the retain inputs:
    g (C + lam I)^-1 for y = x W^T (`linear`), (C + lam I)^-1 g for y = x @ W (`matmul`),
    g / (c + lam) elementwise for a LayerNorm weight (`scale`), each row of g divided by its
    token's c + lam for an embedding table (`rows`: `matmul` with one-hot inputs, C diagonal),
    where C = E[x x^T] (c its diagonal, the moment given for `scale` and `rows`) and lam =
    damping x the mean eigenvalue of C.  Among edits with the same
    first-order rise of L_f it is the one that moves the layer's retain outputs least, so it
    still increases L_f: <g, direction> > 0."""
    g, m = grad.double(), moment.double()
    scale = (m.mean() if layout in ("scale", "rows") else torch.trace(m) / m.shape[0]).item()
    if not math.isfinite(scale) or scale <= 0:
        raise UnlearnError(f"the retain inputs of a {tuple(grad.shape)} tensor have zero or non-finite second moment; "
                           "check the retain set, or set slug.search.direction=gradient")
    lam = damping * scale
    if layout == "scale":
        out = g / (m + lam)
    elif layout == "rows":
        out = g / (m + lam)[:, None]
    else:
        a = m + lam * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        out = torch.linalg.solve(a, g.T).T if layout == "linear" else torch.linalg.solve(a, g)
    return out.to(grad.dtype)


def step_directions(adapter: Adapter, forget_grads: dict[str, torch.Tensor], layers: Sequence[str], cfg: SearchConfig,
                    moments: Moments | None) -> dict[str, torch.Tensor]:
    """The edit direction of each layer in `layers`.  `gradient` (the paper): g_f itself.
    `retain_preconditioned`: g_f preconditioned by the second moments of the layer's inputs on
    the retain set (`moments`, from the retain statistics, or a function giving them for the
    layers asked: the kept moments, `unlearn.methods.kept`; see `precondition`)."""
    if cfg.direction == "gradient":
        return {layer: forget_grads[layer] for layer in layers}
    if callable(moments):
        moments = moments(list(layers))
    lacking = [layer for layer in layers if moments is None or layer not in moments]
    if lacking:
        raise UnlearnError(f"the retain statistics hold no input moments of {lacking[:3]}; re-run `dvc repro retain_stats` "
                           "(or set slug.search.direction=gradient)")
    return {layer: precondition(forget_grads[layer], moments[layer].to(forget_grads[layer].device), adapter.input_layout(layer), cfg.damping)
            for layer in layers}


@dataclass(frozen=True)
class Step:
    rho: float
    result: dict
    forget_ok: bool


def search_step(evaluate: Callable[[float], dict], forget_ok: Callable[[dict], bool], rho_start: float, rho_max: float, max_evals: int,
                tolerance: float = 0.0) -> list[Step]:
    """The smallest relative step that passes the forget criterion, assuming it is monotone in rho:
    double from `rho_start` while it fails (up to `rho_max`), then bisect between the last failing
    and the first passing step with the evaluations left, until the bracket is narrower than
    `tolerance` times the passing step (0: use every evaluation, as the reference does).
    Returns every evaluation in order."""
    if not 0 < rho_start <= rho_max or max_evals < 1 or not 0 <= tolerance < 1:
        raise UnlearnError(f"step search needs 0 < rho_start <= rho_max, max_evals >= 1 and 0 <= rho_tolerance < 1 "
                           f"(got {rho_start}, {rho_max}, {max_evals}, {tolerance})")
    steps: list[Step] = []

    def run(rho: float) -> bool:
        result = evaluate(rho)
        steps.append(Step(rho, result, bool(forget_ok(result))))
        return steps[-1].forget_ok

    lo, hi, rho = 0.0, None, rho_start
    while len(steps) < max_evals:
        if run(rho):
            hi = rho
            break
        lo = rho
        if rho >= rho_max:
            return steps
        rho = min(rho * 2, rho_max)
    if hi is None:
        return steps
    while len(steps) < max_evals and hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if run(mid):
            hi = mid
        else:
            lo = mid
    return steps


# ---------------------------------------------------------------- the one-layer patch

PATCH_WEIGHTS, PATCH_META = "patch.safetensors", "patch.json"
ROWS_SUFFIX = ":rows"  # beside a delta stored by rows: the indices of its rows that are not zero


def sparse_rows(delta: torch.Tensor) -> torch.Tensor | None:
    """The indices of the rows of `delta` that are not zero, if fewer than half of them are (an
    embedding table's edit moves the rows of the tokens the forget captions hold); else None."""
    if delta.dim() < 2:
        return None
    nonzero = delta.reshape(delta.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()
    return nonzero if 2 * len(nonzero) < delta.shape[0] else None


def save_patch(directory: Path, layer: str, delta: torch.Tensor, meta: dict) -> None:
    """The one-layer edit as safetensors beside its metadata.  A delta most of whose rows are zero
    (`sparse_rows`) is stored by its nonzero rows and their indices (`rows` in the metadata);
    `read_patch` gives it back whole."""
    delta = delta.detach().contiguous().cpu()
    nonzero = sparse_rows(delta)
    by_rows = nonzero is not None
    tensors = {layer: delta[nonzero].contiguous(), layer + ROWS_SUFFIX: nonzero} if by_rows else {layer: delta}
    save_safetensors(tensors, directory / PATCH_WEIGHTS, metadata={"layer": layer})
    write_json(directory / PATCH_META, meta | {"layer": layer, "shape": list(delta.shape), **({"rows": len(nonzero)} if by_rows else {}),
                                                "weights_sha256": sha256_file(directory / PATCH_WEIGHTS)})


def read_patch(directory: str | Path, rerun: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved patch's metadata and tensors, refused with one line (naming `rerun`, the stage that
    makes it) when a file is missing, its weights do not hash as recorded (a flipped byte, a
    truncated copy) or they hold NaN or inf."""
    meta, tensors = read_hashed_tensors(directory, PATCH_META, (PATCH_WEIGHTS,), lambda m: {PATCH_WEIGHTS: m.get("weights_sha256")}, "SLUG patch", rerun)
    tensors = dict(tensors[PATCH_WEIGHTS])
    for name in [n for n in tensors if n.endswith(ROWS_SUFFIX)]:
        index, rows, layer = tensors.pop(name), tensors.get(name.removesuffix(ROWS_SUFFIX)), name.removesuffix(ROWS_SUFFIX)
        shape = meta.get("shape") if meta.get("layer") == layer else None
        if rows is None or shape is None or index.dim() != 1 or len(index) != rows.shape[0] or (len(index) and int(index.max()) >= shape[0]):
            raise UnlearnError(f"SLUG patch {directory} stores {layer} by rows but its indices, rows and recorded shape do not agree; {rerun}")
        whole = torch.zeros(shape, dtype=rows.dtype)
        whole[index] = rows
        tensors[layer] = whole
    return meta, tensors


def apply_patch(adapter: Adapter, directory: str | Path, model_dir: str | Path | None = None) -> dict:
    """Add a saved one-layer edit to the model in place (edits of several concepts add up);
    returns the patch's metadata.  With `model_dir`, check that the patch was made for it."""
    directory = Path(directory)
    meta, tensors = read_patch(directory, "re-run the search stage")
    if meta.get("family", "open_clip") != adapter.family:  # patches written before families existed are open_clip's
        raise UnlearnError(f"patch {directory} was made for a {meta.get('family')} model, not this {adapter.family} one; "
                           "re-run the search stage for this model (or export the patched model)")
    if model_dir is not None:
        check_made_for(f"patch {directory}", {"family": meta.get("family"), "model_sha256": meta.get("base_model_sha256")}, model_dir,
                       "re-run the search stage")
    params = dict(adapter.model.named_parameters())
    for name, delta in tensors.items():
        if name not in params or tuple(params[name].shape) != tuple(delta.shape):
            raise UnlearnError(f"patch {directory} edits {name} {tuple(delta.shape)}, which this model does not have")
        with torch.no_grad():
            params[name].add_(delta.to(params[name]))
    return meta


# ---------------------------------------------------------------- the search over front layers

@dataclass(frozen=True)
class SearchConfig:
    max_layers: int = 8            # layers searched by Pareto rank (front first), alternating the towers
    rho_start: float = 0.1
    rho_max: float = 12.8
    evals_per_layer: int = 10      # at most, per layer (the margin step comes on top)
    rho_tolerance: float = 0.05    # bisection stops once the bracket is within this fraction of the passing rho
    forget_top1: float = 0.0       # the forget criterion on the validation images: FA@1 <= ..
    forget_top5: float = 0.05      # .. and FA@5 <= .., for the kinds in top5_kinds
    top5_kinds: tuple[str, ...] = ("identity", "object")  # a style is one of 8 classes (its top 5 hold most of them): FA@1 alone
    max_identity_drop: float = 0.03  # the utility guard: identity @1 and object (ImageNet-style) @1
    max_object_drop: float = 0.02    # may fall by at most these fractions from the base (validation)
    max_style_drop: float = 0.03     # the other styles @1, when the target is a style
    rho_margin: float = 1.2        # the edit uses margin x the smallest passing rho found on validation
    direction: str = "retain_preconditioned"  # or gradient: g_f (the paper); see step_directions
    damping: float = 0.1           # lam of retain_preconditioned, as a fraction of the mean eigenvalue of C_r
    moments: str = "shared"        # C of retain_preconditioned: shared: the retain pairs' | kept: pooled with every other concept's of the table (unlearn.methods.kept)
    evaluate: str = "decisions"    # decisions: retain and other-kind sets scored only where the choice reads them (see search_layers) | all
    stop: str = "all"              # all: search every planned layer, keep the best | first: stop at the first layer (by Pareto rank) that passes
    fallback: str = "forget"       # when no layer passes: forget: the step that forgets most | guard: the one that forgets most within the guard
    widen_to: int = 0              # when none of the max_layers planned layers passes, search further front layers up to this many in all (0: never)

    RANGES: ClassVar[dict[str, str]] = {"widen_to": ">= 0"}  # checked by as_config; the other numbers by the check stage (unlearn/ranges.py)

    def __post_init__(self) -> None:
        check_direction(self.direction, self.damping)
        if self.stop not in ("all", "first"):
            raise UnlearnError(f"slug.search.stop is {self.stop!r}; use all (search every planned layer and keep the best) or first "
                               "(stop at the first layer, by Pareto rank, whose edit passes the forget criterion and the guard)")
        unknown = set(self.top5_kinds) - set(KINDS)
        if unknown:
            raise UnlearnError(f"slug.search.top5_kinds names {sorted(unknown)}; use kinds of the concept table ({', '.join(KINDS)})")
        check_fallback(self.fallback)
        if self.moments not in ("shared", "kept"):
            raise UnlearnError(f"slug.search.moments is {self.moments!r}; use shared (the retain pairs' input moments) or kept (pooled with those "
                               "of every other concept of the table: stage concept_moments)")
        if self.moments == "kept" and self.direction != "retain_preconditioned":
            raise UnlearnError("slug.search.moments is kept, which changes the retain-preconditioned direction's moments only, but "
                               f"slug.search.direction is {self.direction}: set slug.search.moments=shared or slug.search.direction=retain_preconditioned")
        if self.evaluate not in ("decisions", "all"):
            raise UnlearnError(f"slug.search.evaluate is {self.evaluate!r}; use decisions (score the guard sets only for steps that "
                               "pass the forget criterion) or all")


def interleave_fronts(fronts: dict[str, list[str]], limit: int) -> list[str]:
    """Front layers of both towers, alternating (each tower's by importance), at most `limit`."""
    out: list[str] = []
    queues = [list(v) for v in fronts.values()]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


BOUND = {"identity": "max_identity_drop", "object": "max_object_drop", "style": "max_style_drop"}


def guard_ok(result: dict, base: dict, cfg: SearchConfig, kind: str) -> bool:
    """Retain is the target's own kind, utility the other kind (`OTHER_KIND`): each set has the
    bound of its kind."""
    utility_bound = getattr(cfg, BOUND[OTHER_KIND[kind]])
    return retain_bound_ok(result, base, cfg, kind) and result["utility_top1"] >= base["utility_top1"] - utility_bound - 1e-9


def retain_floor(base: dict, cfg: SearchConfig, kind: str) -> float:
    """The lowest retain @1 the guard accepts: the base model's, less the kind's bound."""
    return base["retain_top1"] - getattr(cfg, BOUND[kind]) - 1e-9


def retain_bound_ok(result: dict, base: dict, cfg: SearchConfig, kind: str) -> bool:
    """The guard's bound on the target kind's own retain set alone (part of `guard_ok`)."""
    return result["retain_top1"] >= retain_floor(base, cfg, kind)


def forget_ok(result: dict, cfg: SearchConfig, kind: str) -> bool:
    """FA@1 <= forget_top1, and FA@5 <= forget_top5 where the kind is in `top5_kinds`; a forget
    set given up above its ceiling (FA@1 None) fails."""
    if result["forget_top1"] is None:
        return False
    return result["forget_top1"] <= cfg.forget_top1 + 1e-9 and (kind not in cfg.top5_kinds or result["forget_top5"] <= cfg.forget_top5 + 1e-9)


GUARD_SETS = ("retain", "utility")


def _fmt(v: float | None) -> str:
    return "not scored" if v is None else f"{v:.3f}"


class _Directions(dict):
    """The planned layers' directions; the widened layers' computed on first use, all at once (a
    search that converges on its planned layers never reads their input moments), their time added
    to `times["directions_s"]`."""

    def __init__(self, planned: dict[str, torch.Tensor], widened: Callable[[], dict[str, torch.Tensor]], times: dict[str, float]):
        super().__init__(planned)
        self._widened, self.times = widened, times

    def __missing__(self, layer: str) -> torch.Tensor:
        t = time.perf_counter()
        more, self._widened = self._widened(), dict
        self.update(more)
        self.times["directions_s"] += time.perf_counter() - t
        if layer not in more:
            raise KeyError(layer)
        return more[layer]


def _widened(layers: Sequence[str], widen: Sequence[str], passed: Callable[[], bool]):
    """The planned layers, then the widened ones only if none of the planned passed."""
    yield from layers
    if widen and not passed():
        log.info("none of the %d planned layers passes; searching %d more (slug.search.widen_to)", len(layers), len(widen))
        yield from widen


def search_layers(adapter: Adapter, evaluator, directions: dict[str, torch.Tensor], layers: Sequence[str], cfg: SearchConfig, base: dict,
                  kind: str, times: dict[str, float] | None = None, widen: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Search rho on each layer; every evaluation becomes a row.  Per layer the edit is
    `rho_margin` times the smallest rho that passes the forget criterion (the smallest passing rho
    itself when the margin step fails the guard).  The choice: among layers whose edit passes
    the forget criterion and the utility guard, those whose margin step passed first, then the
    highest mean of retain @1 and other-kind @1 (ties: smaller rho).  If none passes, `converged` is False and
    the best step seen (lowest FA@1, FA@5, then highest utility) is returned instead; with
    `cfg.fallback == "guard"` the best step among those within the guard (the same order), so a
    search that cannot forget within the guard keeps a weaker edit rather than a damaging one (if
    no step is within the guard, the forget rule's step).  An unconverged choice says which rule
    picked it (`fallback`: guard | forget).  With
    `cfg.stop == "first"` the layers after the first that passes are not searched (the reference's
    one front layer, at a fraction of the evaluations; the choice may differ from `all`'s).  The
    layers of `widen` are searched after `layers` only if none of those passes (`cfg.widen_to`), so
    a search that converges on the planned layers is the same with or without them.

    With `cfg.evaluate == "decisions"` every step is scored on the target's images, and on the
    retain and other-kind sets only where the choice reads them: a layer's margin step when it
    passes the forget criterion, its smallest passing step when the margin step is not kept, and,
    when no layer passes, the steps tied for the best forget figures (with the guard fallback, the
    steps group by group of equal forget figures, from the best, up to the first group with a step
    within the guard); and the other-kind set only
    when the retain set's bound holds.  A step failing the forget criterion or a bound is
    rejected whatever its other figures, and a passing step between the two is never kept, so
    the choice is the same as with every step scored on every set (`evaluate: all`).  An evaluator
    whose `stops_early` names the retain set (`Evaluator`, `SdEvaluator`) is asked to give up a
    retain set that can no longer reach its bound (scored part by part): such a row's `scored` is
    `retain_below`, and the forget rule's fallback scores it whole.  One whose `stops_early` names
    the forget set (`SdEvaluator`, which draws it round by round) is asked to give up a forget set
    as soon as it shows the target more often than the criterion allows: such a row's `scored` is
    `forget_above`, its forget figures None and `forget_at_least` the share seen; when no layer
    passes, the fallback scores whole every such row that could tie the best forget figures (with
    the guard fallback, every one that could tie the group being examined, that group's FA@1 at
    or above the row's share seen), so the choice stays that of full scoring.  A row's `scored`
    says which it got; unscored figures are None.  `times` (if given) accumulates the seconds
    spent scoring the forget set and the guard sets, and their counts."""
    params = dict(adapter.model.named_parameters())
    times = times if times is not None else {}
    for k in ("eval_forget_s", "eval_guard_s", "evals_forget", "evals_guard"):
        times.setdefault(k, 0)
    rows: list[dict] = []
    passing: list[dict] = []
    scorers, refills = {}, {}
    # an evaluator that can give up a set that cannot reach a floor is asked to, for the retain set
    # (whose bound rejects a step whatever its other figures): the part it scored decides
    stops = tuple(getattr(evaluator, "stops_early", ()))
    give_up_below = {"retain": retain_floor(base, cfg, kind)} if "retain" in stops else None
    # and the forget set as soon as it fails the criterion (FA@1 alone decides that: FA@5 >= FA@1 never rescues it)
    give_up_above = {"forget": cfg.forget_top1} if "forget" in stops and cfg.evaluate != "all" else None
    utility_floor = base["utility_top1"] - getattr(cfg, BOUND[OTHER_KIND[kind]]) - 1e-9  # the guard's bound on the other kind's set

    def choice_key(r: dict) -> tuple:
        """Among passing steps: margin steps first, then the highest utility score, then the smaller rho."""
        return r["margin_ok"], utility_score(r), -r["rho"]

    def to_beat(margin_ok: bool) -> float | None:
        """The sum retain @1 + other-kind @1 a step must reach to be chosen over the best passing
        step so far (ties kept: the smaller rho breaks them), None if any passing step would be;
        inf if none can be (a step without the margin against a best with it).  Only with
        `evaluate: decisions`: `all` scores every step whole."""
        if not passing or cfg.evaluate == "all":
            return None
        best = max(passing, key=choice_key)
        if best["margin_ok"] != margin_ok:
            return float("inf") if best["margin_ok"] else None
        return best["retain_top1"] + best["utility_top1"] - 1e-9
    for layer in _widened(layers, widen, lambda: bool(passing)):
        param = params[layer]
        original = param.detach().clone()
        step_dir = original.norm() * unit_direction(directions[layer]).to(original)
        evaluator.prepare(layer)

        def score(rho: float, sets: tuple[str, ...], at_least: dict | None = None, at_most: dict | None = None, param=param, original=original,
                  step_dir=step_dir, layer=layer) -> dict:
            kind_ = "forget" if sets == ("forget",) else "guard"  # guard: the retain and/or other-kind set
            t = time.perf_counter()
            with torch.no_grad():
                param.copy_(original + rho * step_dir)
            try:
                stops = {k: v for k, v in (("at_least", at_least), ("at_most", at_most)) if v}  # only an evaluator that stops early takes them
                return evaluator.evaluate(layer, sets, **stops)
            finally:
                with torch.no_grad():
                    param.copy_(original)
                times[f"eval_{kind_}_s"] += time.perf_counter() - t
                times[f"evals_{kind_}"] += 1

        def evaluate(rho: float, score=score) -> dict:
            result = score(rho, ("forget",), at_most=give_up_above)
            if cfg.evaluate == "all":
                return result | score(rho, GUARD_SETS) | {"scored": "all"}
            above = result["forget_top1"] is None
            return result | {k: None for k in ACCURACY_KEYS if not k.startswith("forget")} | {"scored": "forget_above" if above else "forget"}

        def refill(row: dict, score=score) -> dict:
            """Score whole the forget set of a row that gave it up (`forget_above`)."""
            if row["scored"] == "forget_above":
                row.update(score(row["rho"], ("forget",)), scored="forget")
                row.pop("forget_at_least", None)
            return row

        def complete(row: dict, full: bool = False, margin_ok: bool = False, score=score) -> dict:
            """Score the guard sets of a row that has only the forget figures: the target kind's
            retain set first, the other kind's only if the retain bound holds (a row that fails
            it is never chosen) or `full`.  Unless `full`, each set is given up as soon as it
            cannot reach its bound (`scored: retain_below` / `utility_below`, its figures None,
            where the evaluator can give the set up) or the figure the row would need to be
            chosen over the best passing step so far, with or without the margin (`margin_ok`):
            `scored: outranked`, its figures None and `guard_ok` unknown."""
            if row["scored"] in ("retain_below", "utility_below", "outranked") and full:
                row["scored"] = "forget"
                row["guard_ok"] = None
            need = None if full else to_beat(margin_ok)
            if row["scored"] == "forget" and need == float("inf"):
                row["scored"] = "outranked"  # no figure of its own could make it the choice: nothing scored
                return row
            if row["scored"] == "forget":
                floors = dict(give_up_below or {})
                if need is not None and "retain" in stops:
                    floors["retain"] = max(floors.get("retain", -1.0), need - 1.0)  # even with every other-kind image right
                got = score(row["rho"], ("retain",), None if full else floors or None)
                if got.pop("retain_below", False):
                    bound = (give_up_below or {}).get("retain")
                    outranked = bound is None or floors["retain"] > bound
                    row.update(got, scored="outranked" if outranked else "retain_below", guard_ok=None if outranked else False)
                    return row
                row.update(got, scored="retain")
                if not retain_bound_ok(row, base, cfg, kind):
                    row["guard_ok"] = False
            if row["scored"] == "retain" and (full or row["guard_ok"] is None):
                floors = {}
                if not full and "utility" in stops:
                    floors["utility"] = utility_floor if need is None else max(utility_floor, need - row["retain_top1"])
                got = score(row["rho"], ("utility",), floors or None)
                if got.pop("utility_below", False):
                    outranked = floors["utility"] > utility_floor
                    row.update(got, scored="outranked" if outranked else "utility_below", guard_ok=None if outranked else False)
                    return row
                row.update(got, scored="all")
                row["guard_ok"] = guard_ok(row, base, cfg, kind)
            return row

        scorers[layer] = complete
        refills[layer] = refill
        steps = search_step(evaluate, lambda r: forget_ok(r, cfg, kind), cfg.rho_start, cfg.rho_max, cfg.evals_per_layer, cfg.rho_tolerance)
        passed = [s for s in steps if s.forget_ok]
        if passed and cfg.rho_margin != 1.0:
            # the boundary found on a few validation images is optimistic: step a margin past it
            rho = min(s.rho for s in passed) * cfg.rho_margin
            result = evaluate(rho)
            steps.append(Step(rho, result, forget_ok(result, cfg, kind)))
        layer_rows = [{"layer": layer, "tower": adapter.tower(layer), "eval": k, "rho": s.rho, **s.result,
                       "forget_ok": s.forget_ok, "guard_ok": guard_ok(s.result, base, cfg, kind) if s.result["scored"] == "all" else None}
                      for k, s in enumerate(steps)]
        rows.extend(layer_rows)
        if passed:
            # the margin step if it passes both tests, else the smallest passing step: only these
            # two can be kept, so only their guard sets are scored
            smallest = min((r for r in layer_rows[: len(layer_rows) - (cfg.rho_margin != 1.0)] if r["forget_ok"]), key=lambda r: r["rho"])
            margin = layer_rows[-1]
            robust = cfg.rho_margin != 1.0 and margin["forget_ok"] and bool(complete(margin, margin_ok=True)["guard_ok"])
            final = {**(margin if robust else complete(smallest)), "margin_ok": robust}
            log.info("%s: rho %.4g (FA@1 %.3f, FA@5 %.3f, retain %s, utility %s, forget %s, guard %s)", layer, final["rho"],
                     final["forget_top1"], final["forget_top5"], _fmt(final["retain_top1"]), _fmt(final["utility_top1"]), final["forget_ok"],
                     final["guard_ok"])
            if final["forget_ok"] and final["guard_ok"]:
                passing.append(final)
                if cfg.stop == "first":
                    break
        else:
            log.info("%s: no step up to rho %.4g passes the forget criterion", layer, cfg.rho_max)
    if passing:
        choice = max(passing, key=choice_key)
        return rows, {**choice, "converged": True}
    if not rows:
        raise UnlearnError("no layer to search: the Pareto fronts are empty")

    def refill_up_to(ceiling: float | None) -> None:
        """Score whole the forget set of every row that gave it up and could forget as much as
        `ceiling` FA@1 or more (its share seen part way, `forget_at_least`, is a floor of its FA@1);
        every such row if `ceiling` is None."""
        for r in rows:
            if r["scored"] == "forget_above" and (ceiling is None or r["forget_at_least"] <= ceiling + 1e-9):
                refills[r["layer"]](r)

    if cfg.fallback == "guard":
        # no layer passes: the step that forgets most among those within the guard (utility, then the smaller rho, breaking ties),
        # group by group of equal forget figures from the best; a row that gave its forget set up is scored whole only once the
        # group examined could hold it (its floor at or under the group's FA@1), so the choice is that of scoring all of them
        examined: set[tuple[float, float]] = set()
        while True:
            figures = min(((r["forget_top1"], r["forget_top5"]) for r in rows if r["forget_top1"] is not None
                           and (r["forget_top1"], r["forget_top5"]) not in examined), default=None)
            waiting = sum(r["scored"] == "forget_above" for r in rows)
            refill_up_to(None if figures is None else figures[0])
            if waiting != sum(r["scored"] == "forget_above" for r in rows):
                continue  # a row scored whole may forget more than the group: look again
            if figures is None:
                break
            examined.add(figures)
            tied = [scorers[r["layer"]](r) for r in rows if (r["forget_top1"], r["forget_top5"]) == figures]
            within = [r for r in tied if r["guard_ok"]]
            if within:
                best = max(within, key=lambda r: (utility_score(r), -r["rho"]))
                log.info("no layer passes; within the guard, %s at rho %.4g forgets most (FA@1 %.3f, FA@5 %.3f)", best["layer"], best["rho"],
                         best["forget_top1"], best["forget_top5"])
                return rows, {**best, "converged": False, "fallback": "guard"}
        log.warning("no step of the search is within the guard, not even the smallest; keeping the step that forgets most")
    # rows that gave their forget set up: scored whole where they could tie the best forget figures
    refill_up_to(min((r["forget_top1"] for r in rows if r["forget_top1"] is not None), default=None))
    rows_known = [r for r in rows if r["forget_top1"] is not None]
    # no layer passes: the best step by forget figures, utility breaking ties (scored now where it was not)
    least = min((r["forget_top1"], r["forget_top5"]) for r in rows_known)
    for r in rows_known:
        if (r["forget_top1"], r["forget_top5"]) == least:
            scorers[r["layer"]](r, full=True)
    best = min((r for r in rows_known if r["scored"] == "all"), key=lambda r: (r["forget_top1"], r["forget_top5"], -utility_score(r), r["rho"]))
    return rows, {**best, "converged": False, "fallback": "forget"}


# ---------------------------------------------------------------- the sequence, written once

def forget_gradient(adapter: Adapter, forget_batches: Iterable, progress: bool = False) -> tuple[dict[str, torch.Tensor], int, float]:
    """The per-concept part of the one gradient pass: +grad L_f on the forget pairs at the current
    weights (eval mode: no dropout).  Returns (gradient, pairs, mean loss).  The retain gradient
    is shared by every concept (`retain_stats`)."""
    adapter.model.eval()
    return mean_gradient(adapter, adapter.forget_loss, forget_batches, "forget gradient" if progress else None)


@dataclass(frozen=True)
class RankConfig:
    include_layernorm: bool = False   # LayerNorm weights as candidates too
    alignment: str = "abs"            # abs | signed (see rank_towers)
    towers: tuple[str, ...] | list[str] | None = None  # the towers whose tensors are candidates; None: every tower of the model


def rank_towers_of(adapter: Adapter, cfg: RankConfig) -> tuple[str, ...]:
    """The towers to rank: `cfg.towers` checked against the model's, or all of them."""
    if cfg.towers is None:
        return tuple(adapter.towers)
    towers = tuple(cfg.towers)
    unknown = [t for t in towers if t not in adapter.towers]
    if unknown or not towers or len(set(towers)) != len(towers):
        raise UnlearnError(f"slug.rank.towers is {list(towers)}; this {adapter.family} model has the towers {', '.join(adapter.towers)} "
                           "(list one or more of them, each once)")
    return towers


def rank(adapter: Adapter, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor], cfg: RankConfig,
         keep: Callable[[str], bool] | None = None, extra: Sequence[str] = ()) -> Ranking:
    """Importance and alignment of every candidate tensor of the chosen towers, ranked per tower.
    `keep` (if given) narrows the candidates further, e.g. to the tensors a VLM reads; `extra`
    names tensors the adapter does not offer that are candidates too (the diffusion track's token
    embedding, `unlearn.sd.unlearn.TOKEN_EMBEDDING`)."""
    towers = rank_towers_of(adapter, cfg)
    params = dict(adapter.model.named_parameters())
    unknown = [n for n in extra if n not in params]
    if unknown:
        raise UnlearnError(f"this {adapter.family} model has no tensor {unknown[0]!r} to add to the candidates")
    offered = adapter.candidate_layers(bool(cfg.include_layernorm))
    candidates = [n for n in [*offered, *(n for n in extra if n not in offered)] if adapter.tower(n) in towers and (keep is None or keep(n))]
    if not candidates:
        raise UnlearnError(f"no candidate tensor left to rank in the towers {', '.join(towers)}; widen slug.rank.towers")
    return rank_towers(layer_scores(adapter, forget, retain, candidates), towers, cfg.alignment)


@dataclass(frozen=True)
class Edit:
    """The outcome of the search: the chosen layer, its step and delta, every evaluation."""

    layer: str
    rho: float
    delta: torch.Tensor
    converged: bool
    choice: dict          # the chosen evaluation's row (validation figures)
    rows: list[dict]      # every evaluation
    layers: list[str]     # the searched layers, in order
    base: dict            # the unedited model on the validation images
    times: dict           # seconds: directions, eval_forget_s / eval_guard_s (and evals_forget / evals_guard counts), base_eval


def search(adapter: Adapter, evaluator, forget: dict[str, torch.Tensor], front: dict, order: dict[str, list[str]], cfg: SearchConfig,
           kind: str, moments: Moments | None) -> Edit:
    """The layers to try (by Pareto rank), their edit directions, the step search on the
    evaluator's (validation) images and the chosen edit; the model is left unedited."""
    layers = plan_layers(front, order, cfg.max_layers)
    widen = plan_layers(front, order, cfg.widen_to)[len(layers):] if cfg.widen_to > cfg.max_layers else []  # the plan's next layers
    t0 = time.perf_counter()
    evaluator.reset()
    base = evaluator.evaluate(reference=True)
    log.info("base model on validation: %s", base)
    t1 = time.perf_counter()
    times = {"base_eval_s": t1 - t0, "directions_s": 0.0}
    directions = _Directions(step_directions(adapter, forget, layers, cfg, moments), lambda: step_directions(adapter, forget, widen, cfg, moments), times)
    times["directions_s"] += time.perf_counter() - t1
    rows, choice = search_layers(adapter, evaluator, directions, layers, cfg, base, kind, times, widen)
    param = dict(adapter.model.named_parameters())[choice["layer"]]
    delta = edit_delta(param.detach(), directions[choice["layer"]], choice["rho"])
    searched = list(dict.fromkeys(r["layer"] for r in rows))
    return Edit(choice["layer"], choice["rho"], delta, bool(choice["converged"]), choice, rows, searched, base,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in times.items()})


def apply_edit(adapter: Adapter, layer: str, delta: torch.Tensor) -> None:
    param = dict(adapter.model.named_parameters())[layer]
    with torch.no_grad():
        param.add_(delta.to(param))


def find_edit(adapter: Adapter, forget_batches: Callable[[], Iterable], retain: RetainStats, evaluator, kind: str,
              rank_cfg: RankConfig, search_cfg: SearchConfig, keep: Callable[[str], bool] | None = None,
              moments: Moments | None = None, extra: Sequence[str] = (), first: Sequence[str] = ()) -> tuple[Edit, dict[str, float]]:
    """SLUG for one concept, given the shared retain statistics: forget gradient, ranking (of the
    candidates `keep` accepts, if given, with the tensors `extra` names: `rank`) and search (the
    candidates `first` names searched before the ranked ones, within `max_layers`); the model is
    left unedited.  The step's input
    moments are `moments` if given (the concept's kept moments: `TableMoments.kept_source`), else
    the retain statistics'; `search_cfg.moments` says which the caller must give.  Returns the
    edit and the wall time of each phase (the search's split by what it scored)."""
    if search_cfg.moments == "kept" and moments is None:
        raise UnlearnError("slug.search.moments is kept but no concept moments were given; run the stage after `dvc repro concept_moments` "
                           "or set slug.search.moments=shared")
    t0 = time.perf_counter()
    g_f, _, _ = forget_gradient(adapter, forget_batches())
    t1 = time.perf_counter()
    ranking = rank(adapter, g_f, retain.gradient, rank_cfg, keep, extra)
    order = {t: [*(n for n in first if n in names), *(n for n in names if n not in first)] for t, names in ranking.order.items()}
    t2 = time.perf_counter()
    edit = search(adapter, evaluator, g_f, ranking.front_scores(), order, search_cfg, kind, retain.moments if moments is None else moments)
    t3 = time.perf_counter()
    phases = {k[:-2]: v for k, v in edit.times.items() if k.endswith("_s")}
    return edit, {"forget_gradient": t1 - t0, "rank_layers": t2 - t1, "search": t3 - t2, **phases, "unlearn": t3 - t0}


def unlearn(adapter: Adapter, forget_batches: Callable[[], Iterable], retain: RetainStats, evaluator, kind: str,
            rank_cfg: RankConfig, search_cfg: SearchConfig, moments: Moments | None = None) -> tuple[Edit, dict[str, float]]:
    """`find_edit`, and the edit applied in place (timed with it)."""
    t0 = time.perf_counter()
    edit, times = find_edit(adapter, forget_batches, retain, evaluator, kind, rank_cfg, search_cfg, moments=moments)
    apply_edit(adapter, edit.layer, edit.delta)
    times["unlearn"] = time.perf_counter() - t0
    return edit, times


def gradient_record(adapter_dir: str | Path, forget_manifest: str | Path, n_forget: int, forget_loss: float, batch_size: int,
                    seed: int) -> GradientRecord:
    """The sidecar of the forget gradient of the model saved in `adapter_dir`."""
    return GradientRecord(model_sha256=fingerprint(adapter_dir), forget_manifest_sha256=sha256_file(forget_manifest), n_forget=n_forget,
                          batch_size=batch_size, seed=seed, forget_loss=round(forget_loss, 6), family=read_family(adapter_dir)["family"])


# ---------------------------------------------------------------- SLUG as a registered method

@dataclass(frozen=True)
class SlugConfig:
    rank: RankConfig
    search: SearchConfig


def slug_config(values: dict, key: str = "slug") -> SlugConfig:
    """params.yaml's `slug` section: `rank` and `search`."""
    from unlearn.params import as_config

    missing = [k for k in ("rank", "search") if k not in values]
    if missing or set(values) - {"rank", "search"}:
        raise UnlearnError(f"params.yaml {key} must hold exactly rank and search (missing {missing}, unknown {sorted(set(values) - {'rank', 'search'})}); "
                           "copy them from the committed params.yaml")
    return SlugConfig(as_config(RankConfig, values["rank"], f"{key}.rank"), as_config(SearchConfig, values["search"], f"{key}.search"))


@register("slug", slug_config, "one gradient pass, Pareto ranking, a single-layer step search")
def run(ctx: Context, cfg: SlugConfig) -> Outcome:
    """With `ctx.retain_stats` (the shared statistics, as in the comparison) only the per-concept
    work is timed; without, the statistics are computed first and timed apart (`retain_stats`)."""
    stats, t0 = ctx.retain_stats, time.perf_counter()
    if stats is None:
        stats = compute_retain_stats(ctx.adapter, lambda: chunks(ctx.retain, ctx.grad_batch), with_moments=cfg.search.direction != "gradient")
    once = time.perf_counter() - t0
    if cfg.search.moments == "kept" and (ctx.retain_moments is None or ctx.retain_stats is None):
        raise UnlearnError("slug.search.moments is kept but the run was given no concept moments over shared retain statistics "
                           "(stages retain_stats, concept_moments); set slug.search.moments=shared")
    moments = ctx.retain_moments if cfg.search.moments == "kept" else None
    edit, times = unlearn(ctx.adapter, lambda: chunks(ctx.forget, ctx.grad_batch), stats, ctx.evaluator, ctx.kind, cfg.rank, cfg.search, moments)
    if ctx.retain_stats is None:
        times["retain_stats"] = once
    return Outcome("ok" if edit.converged else "not_forgotten", {k: round(v, 3) for k, v in times.items()},
                   details={"layer": edit.layer, "rho": edit.rho, "converged": edit.converged, "evaluations": len(edit.rows),
                            **({} if edit.converged else {"fallback": edit.choice["fallback"]}),
                            "evals_forget": edit.times["evals_forget"], "evals_guard": edit.times["evals_guard"],
                            "direction": cfg.search.direction, "moments": cfg.search.moments if cfg.search.direction != "gradient" else None,
                            "shared_retain_stats": ctx.retain_stats is not None})
