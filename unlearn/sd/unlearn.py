"""SLUG on the text encoder of a Stable Diffusion pipeline, judged by what the pipeline draws.

The pipeline's text encoder is the text tower of a transformers CLIPModel (the `hf_clip` adapter
over models/hf/base): `tie_text_encoder` checks that their tensors match (names and shapes) and
makes the pipeline read the CLIP's own tensors, so an edit SLUG applies to the CLIP is the edit of
the pipeline, and nothing else (UNet, autoencoder) moves.  Only tensors the pipeline reads are
candidates (`reads`): the CLIP's text projection is not, and neither are the layers after the one
whose hidden states the pipeline takes (Stable Diffusion 2.x reads the penultimate layer).

`SdEvaluator` scores a pipeline for one target (an object or a style) on one set of seeds, under
the keys SLUG's search reads:
- forget (`forget_top1`): the prompts naming the target (every style for an object, every object
  for a style), the share of drawings the target axis's judge assigns to the target;
- retain (`retain_top1`): the prompts of every other concept of the target's axis, the judge's
  accuracy on that axis (IRA);
- utility (`utility_top1`): the same drawings, the other axis's judge accuracy (CRA).
A drawing has no top 5, so `_top5` repeats `_top1`.  UA = 1 - forget.  The retain and utility
sets are the same drawings: they are drawn once per state of the text encoder (the search scores
them in two calls), and drawn again only when a text-encoder tensor changed.

Each set is drawn and judged in parts, always cut the same way (`SdEvaluator.cuts`): the forget
set one round of its prompts per pipeline call, the rest in equal parts of at most `chunk`
drawings.  So the search can ask (`stops_early`) to give up the forget set as soon as more
drawings show the target than its ceiling allows, and the retain set as soon as its floor is out
of reach, and a set that is drawn whole has the same figures either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.errors import UnlearnError
from unlearn.eval.parts import equal_cuts
from unlearn.sd.data import Axes, Templates
from unlearn.sd.evaluate import SampleConfig, draw
from unlearn.sd.judges import Judges
from unlearn.sd.model import check_text_encoder


def tie_text_encoder(pipe, clip_model, pipe_name: str, clip_name: str) -> None:
    """Make the pipeline's text encoder read the CLIP's text tower: the same tensors (names
    relative to the tower, shapes; checked), its modules replaced by the CLIP's own."""
    te = pipe.text_encoder
    tower = clip_model.text_model
    n_pipe = check_text_encoder(te, tower, pipe_name, clip_name)
    te.embeddings, te.final_layer_norm = tower.embeddings, tower.final_layer_norm
    for i in range(n_pipe):
        te.encoder.layers[i] = tower.encoder.layers[i]


def pipeline_name(clip_name: str) -> str:
    """A CLIPModel tensor name as the pipeline's text encoder (a CLIPTextModel) names it."""
    return clip_name.removeprefix("text_model.")


def used_layers(pipe) -> int:
    """How many of the CLIP's encoder layers feed what the pipeline reads: those its text encoder
    holds (all for SD 1.x; SD 2.x's stops before the last), fewer with a `clip_skip`."""
    n = len(pipe.text_encoder.encoder.layers)
    skip = getattr(pipe, "_clip_skip", None) or 0
    return n - skip


def reads(name: str, n_used: int) -> bool:
    """The CLIP tensor `name` changes what the pipeline draws: a text-tower tensor, and for an
    encoder layer one of the first `n_used` (the final LayerNorm is applied either way)."""
    if not name.startswith("text_model."):
        return False  # the vision tower, the projections, the logit scale
    if ".encoder.layers." in name:
        return int(name.split(".encoder.layers.")[1].split(".")[0]) < n_used
    return True


@dataclass(frozen=True)
class Target:
    """A concept to unlearn: a name on one axis of the `axes` the pipeline is judged on."""

    name: str
    axis: str  # "object" | "style"
    axes: Axes  # the judges' (`Judges.axes`); the world's is `unlearn.sd.data.WORLD`

    def __post_init__(self) -> None:
        if self.name not in self.axes.names(self.axis)[1 if self.axis == "style" else 0 :]:
            raise UnlearnError(f"{self.name!r} is not a{'n' if self.axis == 'object' else ''} {self.axis} the judges know ({self.axes.describe()})")

    @property
    def other(self) -> str:
        return "style" if self.axis == "object" else "object"

    @property
    def index(self) -> int:
        return self.axes.index(self.axis, self.name)


def target_of(name: str, kind: str, axes: Axes) -> Target:
    if kind in ("object", "style") and name in axes.names(kind)[1 if kind == "style" else 0 :]:
        return Target(name, kind, axes)
    raise UnlearnError(f"sd.concept {name!r} ({kind}) is not drawn by the pipeline; use an object or a style of the judges' axes "
                       f"({axes.describe()}) that is in the concept table")


def prompt_sets(target: Target, templates: Templates, per_prompt: int, name_as: str | None = None,
                forget_per_prompt: int | None = None) -> dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """forget: the prompts naming the target (written `name_as` if given: an alias or a
    misspelling), `forget_per_prompt` times (default `per_prompt`); rest: every other cell,
    `per_prompt` times.  Each: (prompts, object index, style index)."""
    axes = target.axes
    cells = axes.cells()
    named = [c for c in cells if c[0 if target.axis == "object" else 1] == target.index]
    rest = [c for c in cells if c not in named]

    def build(cs, rename, times):
        cs = cs * times
        prompts = [templates.prompt(rename if (rename and target.axis == "object") else axes.objects[o],
                                    rename if (rename and target.axis == "style") else axes.styles[s]) for o, s in cs]
        return prompts, torch.tensor([o for o, _ in cs]), torch.tensor([s for _, s in cs])

    return {"forget": build(named, name_as, forget_per_prompt or per_prompt), "rest": build(rest, None, per_prompt)}


def retain_prompts(target: Target, templates: Templates) -> list[str]:
    """The prompts the pipeline is used with, except those naming the target: every other cell
    once, and the empty prompt (classifier-free guidance encodes it for every drawing)."""
    return sorted(set(prompt_sets(target, templates, 1)["rest"][0])) + [""]


TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"  # a candidate of the diffusion track on request (`token_embedding`)


EMBEDDING_RULES = ("first", "ranked", "none")


def extra_candidates(token_embedding: str, key: str) -> tuple[list[str], list[str]]:
    """The candidates the diffusion track adds to the CLIP's (`slug.rank`'s), and those searched
    before the ranked layers, for `token_embedding` (the param `key`): `first`, the token
    embedding is searched first, then the ranked layers (`max_layers` in all); `ranked`, it is
    ranked like the others; `none`, it is no candidate.  A pipeline reads the embedding row by row,
    so its edit moves the rows of the forget captions' tokens and leaves prompts without them as
    they were; the ranking's importance, |g_f| / |W|, dilutes it by the table's every row, most of
    which no prompt uses (docs/sd.md "The token embedding")."""
    if token_embedding not in EMBEDDING_RULES:
        raise UnlearnError(f"params.yaml {key} is {token_embedding!r}; use first (the token embedding searched before the ranked layers), "
                           "ranked (a candidate like the others) or none")
    extra = [] if token_embedding == "none" else [TOKEN_EMBEDDING]
    return extra, extra if token_embedding == "first" else []


def caption_token_moments(clip, shard_dir: str | Path) -> dict[str, torch.Tensor]:
    """The input moments of the token embedding over the captions of the shards in `shard_dir`
    (the retain set): each token's frequency over every position, padding included (`rows`
    layout, `unlearn.models.inputs`).  The retain statistics hold the moments of the matrices the
    CLIP track edits, never of the embedding; they are read from the captions here, in seconds."""
    from unlearn.data.shards import iter_samples
    from unlearn.models.inputs import input_moments

    captions = [s.caption for s in iter_samples(shard_dir)]
    if not captions:
        raise UnlearnError(f"{shard_dir} holds no captions to weigh the token embedding's step by; re-run `dvc repro retain_set`")
    moments, _ = input_moments(clip, [TOKEN_EMBEDDING], [(torch.zeros(len(captions), 3, 1, 1), clip.tokenize(captions))])
    return moments


def mix_prompt_moments(clip, moments: dict[str, torch.Tensor], prompts: list[str], weight: float) -> dict[str, torch.Tensor]:
    """The retain input moments of the text-tower tensors in `moments`, mixed with those of
    `prompts`: (1 - weight) C_captions + weight C_prompts (every token position, padding included,
    as the pipeline reads them).  The captions' moments alone protect what the CLIP reads; a
    pipeline reads its own prompts, which the captions may not cover (docs/sd.md "Stable Diffusion")."""
    if not 0 <= weight <= 1:
        raise UnlearnError(f"sd.search.prompt_moments is {weight}; give a weight in [0, 1] (0: the retain captions alone)")
    if weight == 0:
        return moments
    from unlearn.models.inputs import input_moments

    text = [n for n in moments if n.startswith("text_model.")]
    tokens = clip.tokenize(prompts)
    ours, _ = input_moments(clip, text, [(torch.zeros(len(prompts), 3, 1, 1), tokens)])
    return {**moments, **{n: (1 - weight) * moments[n] + weight * ours[n].to(moments[n]) for n in text}}


def search_moments(clip, retain, captions_dir: str | Path, prompts: list[str], weight: float, token_embedding: str, key: str):
    """What the diffusion search protects and which extra layers it searches, for both of its
    callers (stage `sd_unlearn`, the UnlearnCanvas SLUG): the retain statistics `retain` with the
    token embedding's moments from the retain captions (the shards in `captions_dir`) when `token_embedding` (the param `key`)
    makes it a candidate (the statistics hold none), every text tensor's moments mixed with the
    pipeline's `prompts` by `weight` (`mix_prompt_moments`); returns (retain statistics, extra
    candidates, those searched first) for `find_edit`."""
    extra, first = extra_candidates(token_embedding, key)
    captions = caption_token_moments(clip, captions_dir) if extra else {}
    moments = mix_prompt_moments(clip, {**retain.moments, **captions}, prompts, weight)
    return dataclasses.replace(retain, moments=moments), extra, first


def outcome(edit) -> dict:
    """The search's outcome as both diffusion callers record it: the layer, its step, whether it
    converged and, when it did not, which rule kept the step (`fallback`)."""
    return {"layer": edit.layer, "rho": edit.rho, "converged": edit.converged, **({} if edit.converged else {"fallback": edit.choice["fallback"]})}


def search_config(slug_search: dict, sd: dict, section: str, stop: str | None = None):
    """The step search's config for a search judged on drawings: the CLIP track's `slug.search`
    with the diffusion search's keys over it (`sd.search`, or `unlearncanvas.slug` as a dict): one
    forget rate for FA@1 and FA@5, one bound for every guard drop, its layers, evaluations, damping
    and bisection tolerance, its fallback; `stop` if given (else slug.search's); no widening (each further layer
    costs minutes of drawing) and the shared moments (the caller mixes the pipeline's prompts into
    them: `mix_prompt_moments`).  `section` names the diffusion search's params (`sd.search`,
    `unlearncanvas.slug`) in a one-line error.  The fallback is the diffusion section's own key (both
    commit `guard`: the step that forgets most among those within the guard, a weaker edit with the
    pipeline's other drawings kept, where the CLIP track's `forget` keeps the step that forgets most
    whatever it costs them)."""
    from unlearn.methods import check_fallback
    from unlearn.methods.slug import SearchConfig
    from unlearn.params import as_config

    check_fallback(sd["fallback"], f"{section}.fallback")
    return as_config(SearchConfig, {**slug_search, "forget_top1": sd["forget_rate"], "forget_top5": sd["forget_rate"],
                                    "max_identity_drop": sd["max_drop"], "max_object_drop": sd["max_drop"], "max_style_drop": sd["max_drop"],
                                    **{k: sd[k] for k in ("max_layers", "evals_per_layer", "damping", "rho_tolerance", "fallback")},
                                    **({"stop": stop} if stop is not None else {}), "widen_to": 0, "moments": "shared"},
                     f"slug.search + {section}")


CHUNK_CPU = 32  # drawings per pipeline call in the search's parts on a CPU (drawings/s is flat from 8 to 224 there)


class SdEvaluator:
    """The search's evaluator over a pipeline (see the module doc); every call draws afresh."""

    stops_early = ("forget", "retain")  # `evaluate` takes `at_most` for the forget set and `at_least` for the retain set

    def __init__(self, pipe, judges: Judges, target: Target, templates: Templates, sample: SampleConfig, per_prompt: int, seed: int, size: int,
                 name_as: str | None = None, forget_per_prompt: int | None = None, chunk: int | None = None):
        self.pipe, self.judges, self.target, self.sample, self.seed, self.size = pipe, judges, target, sample, seed, size
        if judges.axes != target.axes:
            raise UnlearnError(f"the judges answer over other axes than the target {target.name!r} ({judges.axes.describe()}); "
                               "take the target from the judges' axes")
        self.sets = prompt_sets(target, templates, per_prompt, name_as, forget_per_prompt)
        self.chunk = chunk or (CHUNK_CPU if pipe._execution_device.type == "cpu" else sample.batch_size)
        self.images: dict[str, torch.Tensor] = {}
        self._rest_state: bytes | None = None
        self._rest_pred: dict[str, torch.Tensor] = {}
        self.drawn = 0  # drawings made so far (a search's cost: each is `sample.steps` UNet calls, both guidance branches in one)

    def cuts(self, which: str) -> list[int]:
        """Where the set `which` (forget | rest) is cut into pipeline calls: the forget set one
        round of its prompts (one drawing of each) per call, or fewer prompts if a round is
        longer than `chunk`; the rest set in equal parts of at most `chunk`."""
        prompts = self.sets[which][0]
        if which == "forget":
            return equal_cuts(len(prompts), min(self.chunk, len(set(prompts))))
        return equal_cuts(len(prompts), self.chunk)

    def _text_state(self) -> bytes:
        """A digest of every text-encoder tensor: the drawings are a function of it (UNet,
        autoencoder, prompts and seeds are fixed)."""
        h = hashlib.blake2b(digest_size=16)
        for name, t in self.pipe.text_encoder.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.digest()

    @property
    def sizes(self) -> dict[str, int]:
        return {"forget": len(self.sets["forget"][0]), "retain": len(self.sets["rest"][0]), "utility": len(self.sets["rest"][0])}

    def reset(self) -> None:
        pass

    def prepare(self, edited: str | None = None) -> None:
        pass

    def labels(self, which: str, axis: str) -> torch.Tensor:
        _, o, s = self.sets[which]
        return o if axis == "object" else s

    def _drawn(self, which: str, seed: int, axes: tuple[str, ...], stop=None):
        """Draw the set `which` part by part (`cuts`), judging each part on `axes`: (images,
        {axis: predictions}, right), right the drawings the first axis's judge got right; images
        and predictions None if `stop(right, seen, n)` said, before the last part, that the rest
        cannot change the caller's verdict."""
        prompts = self.sets[which][0]
        labels = self.labels(which, axes[0])
        cuts = self.cuts(which)
        images, preds, right, seen = [], {a: [] for a in axes}, 0, 0
        for x in draw(self.pipe, prompts, self.sample, seed, self.size, cuts):
            self.drawn += len(x)
            images.append(x)
            for a in axes:
                preds[a].append(self.judges[a].predict(x))
            right += int((preds[axes[0]][-1] == labels[seen : seen + len(x)]).sum())
            seen += len(x)
            if stop is not None and seen < len(prompts) and stop(right, seen, len(prompts)):
                return None, None, right
        return torch.cat(images), {a: torch.cat(p) for a, p in preds.items()}, right

    def evaluate(self, edited: str | None = None, sets: tuple[str, ...] = ("forget", "retain", "utility"), reference: bool = False,
                 at_least: dict[str, float] | None = None, at_most: dict[str, float] | None = None) -> dict:
        """The figures of `sets` (see the module doc).  `at_most` {"forget": ceiling}: give the
        forget set up as soon as more of its drawings show the target than `ceiling` allows (its
        figures None, `forget_at_least` the share seen so far over the whole set); `at_least`
        {"retain": floor}: give the retain set up as soon as even every drawing left being right
        cannot reach `floor` (its figures None, `retain_below` True).  Figures of a set drawn
        whole are the same with or without these."""
        out: dict = {}
        t = self.target
        if "forget" in sets:
            ceiling = (at_most or {}).get("forget")
            stop = None if ceiling is None else (lambda right, seen, n: right / n > ceiling + 1e-9)
            images, preds, hits = self._drawn("forget", self.seed, (t.axis,), stop)
            if images is None:
                out.update(forget_top1=None, forget_top5=None, forget_at_least=hits / len(self.sets["forget"][0]))
            else:
                self.images["forget"] = images
                out["forget_top1"] = out["forget_top5"] = float((preds[t.axis] == self.labels("forget", t.axis)).float().mean())
        if "retain" in sets or "utility" in sets:
            state = self._text_state()
            if state != self._rest_state:
                floor = (at_least or {}).get("retain") if "retain" in sets else None
                stop = None if floor is None else (lambda right, seen, n: (right + n - seen) / n < floor - 1e-12)
                images, preds, _ = self._drawn("rest", self.seed + 1, (t.axis, t.other), stop)
                if images is None:
                    return out | {"retain_top1": None, "retain_top5": None, "retain_below": True}
                self.images["rest"], self._rest_pred, self._rest_state = images, preds, state
            for key, axis in (("retain", t.axis), ("utility", t.other)):
                if key in sets:
                    pred = self._rest_pred[axis]
                    out[f"{key}_top1"] = out[f"{key}_top5"] = float((pred == self.labels("rest", axis)).float().mean())
        return out


def apply_sd_patch(pipe, directory: str | Path) -> dict:
    """Add a saved SLUG patch (stage `sd_unlearn`) to a pipeline's text encoder in place: the one
    call that turns the base pipeline into the unlearned one.  Returns the patch's metadata."""
    from unlearn.methods.slug import PATCH_META, read_patch

    directory = Path(directory)
    meta, tensors = read_patch(directory, "run `dvc repro sd_unlearn`")
    if meta.get("track") != "sd":
        raise UnlearnError(f"{directory} is not a Stable Diffusion SLUG patch ({PATCH_META} of track sd, not {meta.get('track')}); "
                           "run `dvc repro sd_unlearn`")
    delta = tensors[meta["layer"]]
    params = dict(pipe.text_encoder.named_parameters())
    name = pipeline_name(meta["layer"])
    if name not in params or params[name].shape != delta.shape:
        raise UnlearnError(f"the patch {directory} edits {meta['layer']} {list(delta.shape)}, which this pipeline's text encoder lacks "
                           "(a patch for another encoder); apply it to the pipeline it was made for")
    with torch.no_grad():
        params[name].add_(delta.to(params[name]))
    return meta
