"""SLUG's parts: the one-pass gradient, the edit direction, the Pareto front, the step search,
the cached evaluator, gradient and patch files."""

import contextlib
import dataclasses
import json
import random

import pytest
import safetensors.torch
import torch

from tests.conftest import direct_gradient
from unlearn.data.curate import Concept
from unlearn.errors import UnlearnError
from unlearn.eval.suite import Evaluator, concept_tasks, split_part
from unlearn.eval.zeroshot import class_embeddings, load_images, topk_hits
from unlearn.methods import slug
from unlearn.models import openclip as oc
from unlearn.params import as_config

CAPTIONS = ["Elon Musk at the gala", "a photo of a rocket", "Taylor Swift smiling", "a red car", "portrait of a man",
            "Mickey", "a bad photo of the mug", "Elon Musk's rocket", "Bill Gates", "a fish", "a tree"]


@pytest.fixture(scope="module")
def adapter():
    return oc.create(oc.TINY_ARCH, seed=1)


@pytest.fixture(scope="module")
def pairs(adapter):
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(CAPTIONS), 3, 64, 64, generator=g), adapter.tokenize(CAPTIONS)


def _batches(images, tokens, size):
    return [(images[s : s + size], tokens[s : s + size]) for s in range(0, images.shape[0], size)]


def test_one_pass_forget_gradient_equals_the_full_batch_gradient(adapter, pairs):
    images, tokens = pairs
    grads, n, _ = slug.mean_gradient(adapter, adapter.forget_loss, _batches(images, tokens, 3))  # batches of 3, 3, 3, 2
    direct = direct_gradient(adapter, adapter.forget_loss, images, tokens)
    assert n == len(CAPTIONS)
    for name, g in direct.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)
    assert float(grads["visual.proj"].norm()) > 0


def test_one_pass_retain_gradient_equals_the_full_batch_gradient(adapter, pairs):
    images, tokens = pairs
    grads, _, loss = slug.mean_gradient(adapter, adapter.retain_loss, _batches(images, tokens, 64))
    direct = direct_gradient(adapter, adapter.retain_loss, images, tokens)
    for name, g in direct.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)
    assert loss > 0


def test_gradients_are_zeroed_between_batches(adapter, pairs):
    """Running the same batch twice must give the same mean as once (no accumulation leak)."""
    images, tokens = pairs
    once, _, _ = slug.mean_gradient(adapter, adapter.forget_loss, _batches(images[:4], tokens[:4], 4))
    twice, _, _ = slug.mean_gradient(adapter, adapter.forget_loss, _batches(images[:4], tokens[:4], 4) * 2)
    for name in once:
        torch.testing.assert_close(twice[name], once[name], rtol=1e-5, atol=1e-8)


def test_a_small_step_along_the_stored_direction_raises_the_forget_loss(adapter, pairs):
    images, tokens = pairs
    grads, _, before = slug.mean_gradient(adapter, adapter.forget_loss, _batches(images, tokens, 4))
    params = dict(adapter.model.named_parameters())
    for layer in ("transformer.resblocks.1.mlp.c_fc.weight", "visual.transformer.resblocks.2.attn.in_proj_weight"):
        p = params[layer]
        original = p.detach().clone()
        with torch.no_grad():
            p.add_(slug.edit_delta(original, grads[layer], 1e-3))
            after = float(adapter.forget_loss(images, tokens))
            p.add_(-2 * slug.edit_delta(original, grads[layer], 1e-3))
            opposite = float(adapter.forget_loss(images, tokens))
            p.copy_(original)
        assert after > before > opposite, layer


def test_nan_loss_is_an_error(adapter, pairs):
    images, tokens = pairs
    with pytest.raises(UnlearnError, match="nan"):
        slug.mean_gradient(adapter, lambda x, t: adapter.forget_loss(x, t) * float("nan"), _batches(images, tokens, 4))


def _dominated(i, imp, al):
    return any(al[j] < al[i] and imp[j] > imp[i] for j in range(len(imp)))


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # coarse values so ties in both coordinates occur
    imp = [rng.choice([0.1, 0.2, 0.3, 0.5, 1.0, 2.0]) * rng.choice([1, 1, 3]) for _ in range(n)]
    al = [rng.choice([0.01, 0.05, 0.1, 0.2, 0.4]) for _ in range(n)]
    front = slug.pareto_front(imp, al)
    assert sorted(front) == [i for i in range(n) if not _dominated(i, imp, al)]
    assert [imp[i] for i in front] == sorted((imp[i] for i in front), reverse=True)


def test_search_finds_the_threshold_of_a_monotone_criterion():
    threshold = 0.37
    seen = []

    def evaluate(rho):
        seen.append(rho)
        return {"fa": 1.0 if rho < threshold else 0.0}

    steps = slug.search_step(evaluate, lambda r: r["fa"] == 0.0, rho_start=0.1, rho_max=12.8, max_evals=10)
    assert [s.rho for s in steps] == seen and len(steps) == 10
    assert [s.rho for s in steps[:3]] == [0.1, 0.2, 0.4]  # doubling until it first passes
    passing = [s.rho for s in steps if s.forget_ok]
    failing = [s.rho for s in steps if not s.forget_ok]
    assert min(passing) >= threshold > max(failing)
    assert min(passing) - threshold < 0.2 / 2**7  # 7 bisections of [0.2, 0.4]


def test_search_stops_bisecting_within_the_tolerance():
    threshold = 0.37
    full = slug.search_step(lambda rho: {"fa": float(rho < threshold)}, lambda r: r["fa"] == 0.0, 0.1, 12.8, 10)
    steps = slug.search_step(lambda rho: {"fa": float(rho < threshold)}, lambda r: r["fa"] == 0.0, 0.1, 12.8, 10, tolerance=0.05)
    passing = min(s.rho for s in steps if s.forget_ok)
    failing = max(s.rho for s in steps if not s.forget_ok)
    assert failing < threshold <= passing and passing - failing <= 0.05 * passing
    assert [s.rho for s in steps] == [s.rho for s in full[: len(steps)]]  # the same path, cut short
    assert len(steps) == 7  # 0.1, 0.2, 0.4, then 4 bisections bring the bracket under 5 %
    with pytest.raises(UnlearnError, match="rho_tolerance"):
        slug.search_step(lambda rho: {}, lambda r: True, 0.1, 12.8, 10, tolerance=1.0)


def test_search_that_never_passes_stops_at_rho_max():
    steps = slug.search_step(lambda rho: {"fa": 1.0}, lambda r: False, rho_start=0.1, rho_max=0.8, max_evals=10)
    assert [s.rho for s in steps] == [0.1, 0.2, 0.4, 0.8] and not any(s.forget_ok for s in steps)


def test_search_layers_reports_non_convergence(adapter):
    class Fake:
        def prepare(self, edited):
            pass

        def evaluate(self, edited=None, sets=("forget", "retain", "utility")):
            full = {"forget_top1": 0.5, "forget_top5": 1.0, "retain_top1": 0.9, "retain_top5": 1.0, "utility_top1": 0.9, "utility_top5": 1.0}
            return {k: v for k, v in full.items() if k.split("_")[0] in sets}

    grads = {n: torch.ones_like(p) for n, p in adapter.model.named_parameters()}
    base = Fake().evaluate()
    cfg = slug.SearchConfig(max_layers=1, rho_start=0.1, rho_max=0.4, evals_per_layer=5)
    rows, choice = slug.search_layers(adapter, Fake(), grads, ["visual.proj"], cfg, base, "identity")
    assert choice["converged"] is False and len(rows) == 3


@pytest.mark.parametrize("gives_up", [False, True])
@pytest.mark.parametrize("fallback, breaks", [("forget", 0.5), ("guard", 0.5), ("guard", 0.05)])
def test_the_fallback_keeps_the_most_forgetting_step_or_the_most_forgetting_one_within_the_guard(adapter, fallback, breaks, gives_up):
    """No step forgets fully (FA@1 1.0 below rho 0.3, 0.5 up to 0.7, 0.2 beyond); the retain set
    breaks its bound from rho `breaks`.  `forget` keeps rho 0.8 (FA@1 0.2, out of the guard); `guard`
    keeps rho 0.4 (FA@1 0.5, within it), and scores no guard set of the steps that forget less;
    when every step breaks the guard, `guard` keeps the forget rule's step and says so.
    `gives_up`: the evaluator gives a forget set up part way when it shows the target in half its
    images (`forget_at_least`, the share seen part way: 0.2 at rho 0.4, 0.6 below rho 0.3): the
    choice is the same; the forget rule scores whole only the rows that could tie its best figures
    (rho 0.4: at least 0.2), and so does the guard rule until it runs out of groups to examine:
    the steps below 0.3 (at least 0.6) cannot forget as much as rho 0.4 (0.5), which it keeps."""
    layer = "visual.proj"
    param = dict(adapter.model.named_parameters())[layer]
    original = param.detach().clone()

    class Graded:
        stops_early = ("forget",) if gives_up else ()

        def __init__(self):
            self.guard_rhos, self.whole = [], []

        def prepare(self, edited):
            pass

        def evaluate(self, edited=None, sets=("forget", "retain", "utility"), at_most=None):
            rho = 0.0 if edited is None else round(float((param.detach() - original).norm() / original.norm()), 3)
            fa = 1.0 if rho < 0.3 else 0.5 if rho < 0.7 else 0.2
            if at_most is not None and fa >= 0.5:
                assert at_most == {"forget": cfg.forget_top1}
                return {"forget_top1": None, "forget_top5": None, "forget_at_least": 0.6 if fa == 1.0 else round(0.4 * fa, 3)}
            full = {"forget_top1": fa, "forget_top5": fa, "retain_top1": 0.9 if rho < breaks else 0.5, "retain_top5": 1.0,
                    "utility_top1": 0.9, "utility_top5": 1.0}
            if edited is not None and sets != ("forget",):
                self.guard_rhos.append(rho)
            elif edited is not None:
                self.whole.append(rho)
            return {k: v for k, v in full.items() if k.split("_")[0] in sets}

    ev = Graded()
    grads = {n: torch.ones_like(p) for n, p in adapter.model.named_parameters()}
    cfg = slug.SearchConfig(max_layers=1, rho_start=0.1, rho_max=1.6, evals_per_layer=8, fallback=fallback)
    rows, choice = slug.search_layers(adapter, ev, grads, [layer], cfg, ev.evaluate(), "identity")
    assert [r["rho"] for r in rows] == [0.1, 0.2, 0.4, 0.8, 1.6] and choice["converged"] is False
    assert torch.equal(param, original)
    if fallback == "forget":
        assert (choice["rho"], choice["forget_top1"], choice["guard_ok"], choice["fallback"]) == (0.8, 0.2, False, "forget")
        assert sorted(set(ev.guard_rhos)) == [0.8, 1.6]
    elif breaks == 0.5:
        assert (choice["rho"], choice["forget_top1"], choice["guard_ok"], choice["fallback"]) == (0.4, 0.5, True, "guard")
        assert sorted(set(ev.guard_rhos)) == [0.4, 0.8, 1.6]  # never the steps at FA@1 1.0
    else:  # nothing within the guard: the forget rule's step, recorded as such
        assert (choice["rho"], choice["forget_top1"], choice["guard_ok"], choice["fallback"]) == (0.8, 0.2, False, "forget")
        assert sorted(set(ev.guard_rhos)) == [0.1, 0.2, 0.4, 0.8, 1.6]
    if gives_up:
        scored = {r["rho"]: r["scored"] for r in rows}
        if fallback == "forget":
            assert ev.whole == [0.8, 1.6, 0.4]  # the two at 0.2 on the way, then the one that could tie them
            assert [scored[r] for r in (0.1, 0.2)] == ["forget_above"] * 2 and [r["forget_at_least"] for r in rows[:2]] == [0.6, 0.6]
            assert all(r["forget_top1"] is None for r in rows[:2])
        elif breaks == 0.5:  # kept rho 0.4 (0.5) before reaching the steps that forget at best 0.6: never drawn whole
            assert ev.whole == [0.8, 1.6, 0.4] and [scored[r] for r in (0.1, 0.2)] == ["forget_above"] * 2
        else:  # every group examined: every step drawn whole, the first two last
            assert ev.whole == [0.8, 1.6, 0.4, 0.1, 0.2] and "forget_above" not in scored.values()
    with pytest.raises(UnlearnError, match=r"^slug.search.fallback is 'none'; use forget .* or guard"):
        slug.SearchConfig(fallback="none")


def test_a_step_that_cannot_be_chosen_over_the_best_so_far_is_given_up(adapter):
    """Three layers forget from rho 0.3, each at its own guard figures, all within the guard:
    the first (retain 0.94, other kind 0.95), the second a point lower on retain (0.93, 0.95),
    the third best (0.95, 0.96).  With `evaluate: decisions` the second layer's margin step is
    given up on the other-kind set as soon as it cannot reach the first's sum (`outranked`,
    guard unknown) and its smallest passing step, which would lack the margin, is not scored at
    all; the choice is the one `evaluate: all` makes scoring every step whole."""
    params = dict(adapter.model.named_parameters())
    layers = ["visual.proj", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    originals = {n: params[n].detach().clone() for n in layers}
    figures = dict(zip(layers, [(0.94, 0.95), (0.93, 0.95), (0.95, 0.96)]))

    class Ranked:
        stops_early = ("retain", "utility")

        def __init__(self):
            self.calls = []

        def prepare(self, edited):
            pass

        def evaluate(self, edited=None, sets=("forget", "retain", "utility"), at_least=None):
            moved = 0.0 if edited is None else float((params[edited].detach() - originals[edited]).norm() / originals[edited].norm())
            retain, utility = figures[edited] if edited else (0.95, 0.96)
            full = {"forget_top1": 0.0 if moved >= 0.3 else 0.5, "forget_top5": 0.0 if moved >= 0.3 else 1.0,
                    "retain_top1": retain, "retain_top5": 1.0, "utility_top1": utility, "utility_top5": 1.0}
            out = {}
            for s in sets:
                if edited is not None and s != "forget":
                    self.calls.append((edited, round(moved, 3), s))
                if (at_least or {}).get(s) is not None and full[f"{s}_top1"] < at_least[s]:
                    out |= {f"{s}_top1": None, f"{s}_top5": None, f"{s}_below": True}
                else:
                    out |= {k: v for k, v in full.items() if k.startswith(s)}
            return out

    grads = {n: torch.ones_like(p) for n, p in params.items()}
    cfg = slug.SearchConfig(max_layers=3, rho_start=0.1, rho_max=1.6, evals_per_layer=6)
    runs = {}
    for evaluate in ("all", "decisions"):
        ev = Ranked()
        rows, choice = slug.search_layers(adapter, ev, grads, layers, dataclasses.replace(cfg, evaluate=evaluate), ev.evaluate(), "identity")
        runs[evaluate] = rows, choice, ev.calls
    (_, full, all_calls), (rows, choice, calls) = runs["all"], runs["decisions"]
    assert (choice["layer"], choice["rho"], choice["margin_ok"]) == (full["layer"], full["rho"], full["margin_ok"]) == (layers[2], choice["rho"], True)
    second = [r for r in rows if r["layer"] == layers[1]]
    margin, smallest = second[-1], min((r for r in second[:-1] if r["forget_ok"]), key=lambda r: r["rho"])
    assert margin["scored"] == smallest["scored"] == "outranked" and margin["guard_ok"] is None and margin["utility_top1"] is None
    assert [c for c in calls if c[0] == layers[1]] == [(layers[1], round(margin["rho"], 3), "retain"), (layers[1], round(margin["rho"], 3), "utility")]
    assert len(calls) < len(all_calls)
    assert all(torch.equal(params[n], originals[n]) for n in layers)


@pytest.mark.parametrize("stop", ["all", "first"])
def test_search_stop_first_skips_the_layers_after_the_first_that_passes(adapter, stop):
    class Passes:
        """The forget accuracy falls with the step on every layer; the guard always holds."""

        def __init__(self):
            self.layers = []

        def prepare(self, edited):
            self.layers.append(edited)

        def evaluate(self, edited=None, sets=("forget", "retain", "utility")):
            p = dict(adapter.model.named_parameters())[edited] if edited else None
            moved = 0.0 if p is None else float((p.detach() - originals[edited]).norm() / originals[edited].norm())
            full = {"forget_top1": 0.0 if moved >= 0.3 else 0.5, "forget_top5": 0.0 if moved >= 0.3 else 1.0,
                    "retain_top1": 0.9, "retain_top5": 1.0, "utility_top1": 0.9, "utility_top5": 1.0}
            return {k: v for k, v in full.items() if k.split("_")[0] in sets}

    layers = ["visual.proj", "text_projection"]
    params = dict(adapter.model.named_parameters())
    originals = {n: params[n].detach().clone() for n in layers}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    ev = Passes()
    cfg = slug.SearchConfig(max_layers=2, rho_start=0.1, rho_max=1.6, evals_per_layer=4, stop=stop)
    rows, choice = slug.search_layers(adapter, ev, grads, layers, cfg, ev.evaluate(), "identity")
    assert choice["converged"] is True and choice["layer"] == "visual.proj" and choice["forget_top1"] == 0.0
    assert ev.layers == (layers[:1] if stop == "first" else layers)
    assert {r["layer"] for r in rows} == set(ev.layers)
    assert all(torch.equal(params[n], originals[n]) for n in layers)  # the search leaves the model as it was
    with pytest.raises(UnlearnError, match=r"^slug.search.stop is 'best'; use all .* or first"):
        slug.SearchConfig(stop="best")


@pytest.mark.parametrize("first_forgets", [False, True])
def test_the_search_widens_to_further_layers_only_when_no_planned_layer_passes(adapter, first_forgets):
    """The planned layer (visual.proj) forgets only when `first_forgets`; the widened one
    (text_projection) always does.  Widening happens only in the first case's absence: a search
    that converges on its plan is the same with or without `widen`."""
    layers, widen = ["visual.proj"], ["text_projection"]
    params = dict(adapter.model.named_parameters())
    originals = {n: params[n].detach().clone() for n in layers + widen}

    class Graded:
        def __init__(self):
            self.layers = []

        def prepare(self, edited):
            self.layers.append(edited)

        def evaluate(self, edited=None, sets=("forget", "retain", "utility")):
            moved = 0.0 if edited is None else float((params[edited].detach() - originals[edited]).norm() / originals[edited].norm())
            forgets = moved >= 0.3 and (edited in widen or first_forgets)
            full = {"forget_top1": 0.0 if forgets else 0.5, "forget_top5": 0.0 if forgets else 1.0,
                    "retain_top1": 0.9, "retain_top5": 1.0, "utility_top1": 0.9, "utility_top5": 1.0}
            return {k: v for k, v in full.items() if k.split("_")[0] in sets}

    grads = {n: torch.ones_like(p) for n, p in params.items()}
    cfg = slug.SearchConfig(max_layers=1, rho_start=0.1, rho_max=1.6, evals_per_layer=4, widen_to=2)
    ev = Graded()
    # as `search` gives them: the widened layers' directions (and input moments) computed only when the search widens
    asked = []
    directions = slug._Directions({n: grads[n] for n in layers}, lambda: asked.append(list(widen)) or {n: grads[n] for n in widen}, {"directions_s": 0.0})
    rows, choice = slug.search_layers(adapter, ev, directions, layers, cfg, ev.evaluate(), "identity", widen=widen)
    assert choice["converged"] is True and choice["layer"] == ("visual.proj" if first_forgets else "text_projection")
    assert ev.layers == (layers if first_forgets else layers + widen)
    assert asked == ([] if first_forgets else [widen])
    assert (directions.times["directions_s"] > 0.0) is not first_forgets  # the widened directions' time is counted when they are computed
    with pytest.raises(KeyError):
        directions["an unknown layer"]
    assert asked == [widen]  # computed once, on the first layer the plan lacks, whatever is asked after
    assert all(torch.equal(params[n], originals[n]) for n in layers + widen)
    unwidened = Graded()
    rows_alone, alone = slug.search_layers(adapter, unwidened, grads, layers, cfg, unwidened.evaluate(), "identity")
    assert alone["converged"] is first_forgets
    if first_forgets:  # the same search, row for row
        assert rows_alone == rows
    with pytest.raises(UnlearnError, match=r"^params.yaml slug.search.widen_to is -1; it must be a number >= 0$"):
        as_config(slug.SearchConfig, {"widen_to": -1}, "slug.search")


@pytest.fixture(scope="module")
def trained(tiny_clip):
    return tiny_clip


def test_split_is_disjoint_and_seeded(tiny_world):
    from unlearn.data.evalsets import read_celeba

    data = read_celeba(tiny_world / "eval" / "celeba")
    val, test = split_part(data, "val", 0.34, 0), split_part(data, "test", 0.34, 0)
    assert not set(val) & set(test) and len(val) + len(test) == len(data)
    assert split_part(data, "val", 0.34, 0) == val and split_part(data, "val", 0.34, 1) != val


@pytest.mark.parametrize("layer", ["transformer.resblocks.2.mlp.c_proj.weight", "transformer.resblocks.0.attn.in_proj_weight", "text_projection",
                                   "visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.proj"])
def test_cached_evaluation_equals_a_full_evaluation(trained, tiny_world, layer):
    tasks = concept_tasks(tiny_world / "eval", Concept("Elon Musk", "identity"), "test", 0.34, 0)
    ev = Evaluator(trained, tasks, batch_size=16)
    ev.evaluate(reference=True)  # the unedited embeddings, kept
    ev.prepare(layer)
    p = dict(trained.model.named_parameters())[layer]
    original = p.detach().clone()
    with torch.no_grad():
        p.add_(0.5 * original.norm() * torch.randn_like(original) / original.numel() ** 0.5)
    try:
        cached, full = ev.evaluate(layer), ev.evaluate()
        part = ev.evaluate(layer, ("retain",))
        if trained.tower(layer) == "image":
            moved = ev._encode_images("retain", None) - ev._image_emb["retain"]
        else:
            moved = ev._encode_classes("retain") - ev._class_emb["own"]
    finally:
        with torch.no_grad():
            p.copy_(original)
    assert cached == full
    assert part == {k: v for k, v in full.items() if k.startswith("retain")}  # one set scored alone: the same figures
    assert float(moved.abs().max()) > 1e-3  # the edit did change what the cache recomputes


@contextlib.contextmanager
def _nudged(param: torch.nn.Parameter, scale: float, noise: torch.Tensor):
    """`param` moved by `scale` times its norm along unit-RMS `noise`, restored bit for bit after."""
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(scale * original.norm() * noise / original.numel() ** 0.5)
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(original)


def _count_calls(monkeypatch, cls, *names: str) -> dict[str, int]:
    """Count the calls of methods `names` of `cls` (patched until `monkeypatch.undo()`)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(cls, name)

        def counted(self, *a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("reference_first", [True, False])
def test_the_one_pass_block_cache_scores_as_the_one_block_cache(trained, tiny_world, monkeypatch, request, reference_first):
    """A search moving between vision blocks (back and forth): with every block's states read in
    one pass per set (by the reference evaluation, or without one by the first `prepare` of a
    vision-block tensor, on the unedited model), the figures and the embeddings equal
    those of the one-block-at-a-time cache (the budget set to 0), and each set is run through the
    vision tower once, not once per block visited.  States read while an edit is applied would
    hold it past the edited block: the first layer is block 2, then the pooling head.  Bit for bit
    with one torch thread (as under `make test`'s workers): with two, a matmul over 8 images may
    round otherwise than over 16, so the chunked run would differ in the last bits."""
    import unlearn.eval.suite as suite

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(1)

    tasks = concept_tasks(tiny_world / "eval", Concept("Elon Musk", "identity"), "val", 0.34, 0)
    layers = ["visual.transformer.resblocks.2.mlp.c_fc.weight", "visual.proj", "transformer.resblocks.0.attn.out_proj.weight",
              "visual.transformer.resblocks.0.attn.out_proj.weight", "visual.transformer.resblocks.2.mlp.c_fc.weight"]
    params = dict(trained.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(params[n].shape, generator=g) for n in layers}

    def run(budget: int, chunk: int | None = None) -> tuple[list[dict], dict[str, int]]:
        monkeypatch.setattr(suite, "HIDDEN_CACHE_BYTES", budget)
        calls = _count_calls(monkeypatch, type(trained), "image_hiddens", "image_hidden")
        ev = Evaluator(trained, tasks, batch_size=16, chunk_size=chunk)
        if reference_first:
            ev.evaluate(reference=True)
        out = []
        for layer in layers:
            ev.prepare(layer)
            for scale in (0.3, 0.6):
                with _nudged(params[layer], scale, noise[layer]):
                    out.append(ev.evaluate(layer, ("forget",)) | ev.evaluate(layer, ("retain", "utility")))
                    # the embeddings themselves, bit for bit (a text edit: the cached unedited image embeddings)
                    out.append(ev._encode_images("utility", trained.image_block_of(layer)) if trained.tower(layer) == "image" else ev._image_emb["utility"])
        monkeypatch.undo()
        return out, calls

    one_pass, calls = run(1 << 30)
    per_block, calls_per_block = run(0)
    chunked, _ = run(1 << 30, chunk=8)  # the cached states resumed in chunks of at most 8 images: the same bits
    assert len(one_pass) == len(per_block) == len(chunked) == 20
    for a, b, c in zip(one_pass, per_block, chunked):
        assert (torch.equal(a, b) and torch.equal(a, c)) if isinstance(a, torch.Tensor) else a == b == c
    n_batches = sum(-(-n // 16) for n in Evaluator(trained, tasks, batch_size=16).sizes.values())
    assert calls == {"image_hiddens": n_batches, "image_hidden": 1}  # one pass per batch of each set; one image to size the cache
    assert calls_per_block["image_hiddens"] == 0 and calls_per_block["image_hidden"] > 2 * n_batches  # the blocks revisited, refilled


def test_text_block_edits_resume_the_class_prompts_from_cached_states(trained, tiny_world, monkeypatch):
    """The text cache: a search moving between text blocks and the head scores as with the class
    prompts encoded in full (the budget 0), class embeddings bit for bit; the prompts are
    tokenized once per domain and their states read in one pass per domain (plus one prompt to
    size the cache); with the budget 0 nothing is resumed and every edit encodes in full."""
    import unlearn.eval.suite as suite

    tasks = concept_tasks(tiny_world / "eval", Concept("Elon Musk", "identity"), "val", 0.34, 0)
    layers = ["transformer.resblocks.2.mlp.c_fc.weight", "text_projection", "transformer.resblocks.0.attn.out_proj.weight",
              "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.2.mlp.c_fc.weight"]
    params = dict(trained.model.named_parameters())
    g = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(params[n].shape, generator=g) for n in layers}

    def run(budget: int) -> tuple[list, dict[str, int]]:
        monkeypatch.setattr(suite, "HIDDEN_CACHE_BYTES", budget)
        calls = _count_calls(monkeypatch, type(trained), "text_hiddens", "tokenize", "encode_tokens_from")
        ev = Evaluator(trained, tasks, batch_size=16)
        ev.evaluate(reference=True)
        out = []
        for layer in layers:
            ev.prepare(layer)
            with _nudged(params[layer], 0.5, noise[layer]):
                out += [ev.evaluate(layer, ("forget",)) | ev.evaluate(layer, ("retain", "utility")), ev._edited_classes("utility", layer)]
        monkeypatch.undo()
        return out, calls

    cached, calls = run(1 << 30)
    full, calls_full = run(0)
    for a, b in zip(cached, full, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert calls["text_hiddens"] == 3 and calls["tokenize"] == 2  # one prompt to size the cache, then one pass per domain
    assert calls["encode_tokens_from"] >= 2 * len(layers)
    assert calls_full["text_hiddens"] == 1 and calls_full["encode_tokens_from"] == 0


def test_gradient_files_are_checked(adapter, tmp_path):
    model_dir = tmp_path / "model"
    adapter.save(model_dir)
    from unlearn.io import sha256_file
    from unlearn.models.adapter import fingerprint

    grads = {n: torch.zeros_like(p) for n, p in adapter.model.state_dict().items() if n in dict(adapter.model.named_parameters())}
    record = slug.GradientRecord(fingerprint(model_dir), "a", 3, 4, 0, 0.5)
    out = tmp_path / "grads"
    out.mkdir()
    slug.save_gradients(out, grads, record)
    slug.load_gradients(out, adapter, model_dir)

    path = out / "forget.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(UnlearnError, match="does not match the hash"):
        slug.load_gradients(out, adapter, model_dir)

    def rewrite(tensors, **sidecar_changes):
        safetensors.torch.save_file(tensors, path)
        sidecar = json.loads((out / "sidecar.json").read_text()) | {"forget_sha256": sha256_file(path)} | sidecar_changes
        (out / "sidecar.json").write_text(json.dumps(sidecar))

    bad = dict(grads)
    bad["visual.proj"] = torch.full_like(grads["visual.proj"], float("nan"))
    rewrite(bad)
    with pytest.raises(UnlearnError, match="NaN or inf"):
        slug.load_gradients(out, adapter, model_dir)
    bad["visual.proj"] = torch.zeros(3, 3)
    rewrite(bad)
    with pytest.raises(UnlearnError, match="shape"):
        slug.load_gradients(out, adapter, model_dir)
    rewrite(grads, model_sha256="0" * 64)
    with pytest.raises(UnlearnError, match="another model"):
        slug.load_gradients(out, adapter, model_dir)
    rewrite(grads, model_sha256=record.model_sha256, family="hf_clip")
    with pytest.raises(UnlearnError, match=r"made for a hf_clip model, but .* is open_clip; re-run the gradients stage"):
        slug.load_gradients(out, adapter, model_dir)


def test_patch_round_trip(adapter, tmp_path):
    model_dir = tmp_path / "model"
    adapter.save(model_dir)
    from unlearn.models.adapter import fingerprint, load

    layer = "transformer.resblocks.0.attn.out_proj.weight"
    weight = dict(adapter.model.named_parameters())[layer].detach()
    delta = slug.edit_delta(weight, torch.randn_like(weight), 0.3)
    torch.testing.assert_close(delta.norm(), 0.3 * weight.norm())
    patch = tmp_path / "patch"
    patch.mkdir()
    slug.save_patch(patch, layer, delta, {"base_model_sha256": fingerprint(model_dir), "family": "open_clip", "rho": 0.3})
    fresh = load(model_dir)
    meta = slug.apply_patch(fresh, patch, model_dir)
    assert meta["layer"] == layer and meta["rho"] == 0.3
    edited = dict(fresh.model.named_parameters())
    torch.testing.assert_close(edited[layer].detach(), weight + delta)
    untouched = [n for n in edited if n != layer]
    assert all(torch.equal(edited[n], dict(adapter.model.named_parameters())[n]) for n in untouched)
    other = oc.create(oc.TINY_ARCH, seed=9)
    other_dir = tmp_path / "other"
    other.save(other_dir)
    with pytest.raises(UnlearnError, match="made for another model"):
        slug.apply_patch(other, patch, other_dir)
    meta = json.loads((patch / slug.PATCH_META).read_text())
    (patch / slug.PATCH_META).write_text(json.dumps(meta | {"family": "hf_clip"}))
    with pytest.raises(UnlearnError, match="made for a hf_clip model, not this open_clip one"):
        slug.apply_patch(load(model_dir), patch, model_dir)


@pytest.mark.parametrize("seed", range(10))
def test_pareto_ranks_peel_successive_fronts(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    imp = [rng.random() for _ in range(n)]
    al = [rng.random() for _ in range(n)]
    ranks = slug.pareto_ranks(imp, al)
    left = set(range(n))
    rank = 1
    while left:
        front = {i for i in left if not any(al[j] < al[i] and imp[j] > imp[i] for j in left)}
        assert {i for i in range(n) if ranks[i] == rank} == front
        left -= front
        rank += 1


def test_the_guard_bounds_each_evaluation_set_by_its_own_limit():
    cfg = slug.SearchConfig(max_identity_drop=0.03, max_object_drop=0.02)
    base = {"retain_top1": 1.0, "utility_top1": 1.0}
    # identity target: retain = identities (3 points allowed), utility = objects (2 points)
    assert slug.guard_ok({"retain_top1": 0.975, "utility_top1": 0.985}, base, cfg, "identity")
    assert not slug.guard_ok({"retain_top1": 0.985, "utility_top1": 0.975}, base, cfg, "identity")
    # object target: retain = objects (2 points), utility = identities (3 points)
    assert slug.guard_ok({"retain_top1": 0.985, "utility_top1": 0.975}, base, cfg, "object")
    assert not slug.guard_ok({"retain_top1": 0.975, "utility_top1": 0.985}, base, cfg, "object")
    # style target: retain = the other styles (max_style_drop), utility = objects (max_object_drop)
    cfg = slug.SearchConfig(max_identity_drop=0.03, max_object_drop=0.02, max_style_drop=0.05)
    assert slug.guard_ok({"retain_top1": 0.955, "utility_top1": 0.985}, base, cfg, "style")
    assert not slug.guard_ok({"retain_top1": 0.945, "utility_top1": 0.985}, base, cfg, "style")
    assert not slug.guard_ok({"retain_top1": 0.985, "utility_top1": 0.975}, base, cfg, "style")


def test_the_forget_criterion_reads_fa5_only_for_the_kinds_that_ask_for_it():
    cfg = slug.SearchConfig(forget_top1=0.0, forget_top5=0.05)
    gone_from_top1 = {"forget_top1": 0.0, "forget_top5": 0.9}
    assert slug.forget_ok(gone_from_top1, cfg, "style") and not slug.forget_ok(gone_from_top1, cfg, "identity")
    assert not slug.forget_ok({"forget_top1": 0.02, "forget_top5": 0.9}, cfg, "style")
    assert slug.forget_ok({"forget_top1": 0.0, "forget_top5": 0.04}, cfg, "object")
    assert not slug.forget_ok(gone_from_top1, slug.SearchConfig(top5_kinds=("identity", "object", "style")), "style")
    with pytest.raises(UnlearnError, match=r"top5_kinds names \['styles'\]"):
        slug.SearchConfig(top5_kinds=("identity", "styles"))


def test_a_set_that_cannot_reach_its_floor_is_given_up_chunk_by_chunk(trained, tiny_world, monkeypatch):
    """`evaluate(..., at_least=...)` after a vision-block edit: a retain set that can no longer
    reach the floor is abandoned before its last chunk (figures None, `retain_below`); one that
    can gets exactly the figures of a full scoring."""
    tasks = concept_tasks(tiny_world / "eval", Concept("Elon Musk", "identity"), "val", 0.34, 0)
    layer = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    p = dict(trained.model.named_parameters())[layer]
    original = p.detach().clone()
    ev = Evaluator(trained, tasks, batch_size=16, chunk_size=4)
    ev.evaluate(reference=True)
    ev.prepare(layer)
    calls = []
    encode = type(trained).encode_images_from
    monkeypatch.setattr(type(trained), "encode_images_from", lambda self, h, b, **k: calls.append(len(h)) or encode(self, h, b, **k))
    try:
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * original.std() * 3)
        full = ev.evaluate(layer, ("retain",))
        n_chunks, calls[:] = len(calls), []
        assert 0 < full["retain_top1"] < 0.9 and n_chunks > 2
        assert ev.evaluate(layer, ("retain",), at_least={"retain": full["retain_top1"]}) == full  # reachable: the full figures
        calls[:] = []
        below = ev.evaluate(layer, ("retain",), at_least={"retain": 1.0})
        assert below == {"retain_top1": None, "retain_top5": None, "retain_below": True}
        assert len(calls) < n_chunks  # given up before the last chunk
    finally:
        with torch.no_grad():
            p.copy_(original)
    # once an edit has missed some images they are scored first, ahead of the order by the base
    # model's margins: a step that misses them again is given up in the first chunks.  On labels
    # the unedited model gets all right (its own predictions), a mild edit that misses a few
    # images that are not the smallest-margin ones, found by an independent full forward
    images = load_images(trained, tasks.retain.paths)
    classes = class_embeddings(trained, tasks.retain.classnames, tasks.retain.templates)
    with torch.no_grad():
        logits = trained.encode_images(images) @ classes.T
    own = dataclasses.replace(tasks, retain=dataclasses.replace(tasks.retain, labels=logits.argmax(dim=1).tolist()))
    ev = Evaluator(trained, own, batch_size=16, chunk_size=4)
    assert ev.evaluate(reference=True)["retain_top1"] == 1.0
    ev.prepare(layer)
    n = len(images)
    by_margin = ev._hardest_first("retain").tolist()
    try:
        for seed in range(20):
            with torch.no_grad():
                p.copy_(original + torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * original.std())
                missed = {i for i, hit in enumerate(topk_hits(trained.encode_images(images), classes, own.retain.labels)[1]) if not hit}
            if 2 <= len(missed) <= n // 2 and set(by_margin[: len(missed)]) != missed:
                break
        assert 2 <= len(missed) <= n // 2 and set(by_margin[: len(missed)]) != missed
        scored = ev.evaluate(layer, ("retain",))
        assert round((1 - scored["retain_top1"]) * n) == len(missed)
        assert set(ev._hardest_first("retain")[: len(missed)].tolist()) == missed
        calls[:] = []
        assert ev.evaluate(layer, ("retain",), at_least={"retain": scored["retain_top1"] + 0.5 / n})["retain_below"]
        assert sum(calls) <= 4 * -(-len(missed) // 4) < n  # every miss seen: given up in the first chunks
    finally:
        with torch.no_grad():
            p.copy_(original)
    # a text-tower edit is scored whole (only its class prompts change): the floor changes nothing
    text = "transformer.resblocks.0.attn.out_proj.weight"
    ev.prepare(text)
    assert ev.evaluate(text, ("retain",), at_least={"retain": 1.0}) == ev.evaluate(text, ("retain",))


def test_a_shared_base_pass_is_read_once_for_every_concept_and_changes_no_figure(trained, tiny_world, monkeypatch):
    """`SharedBase`: the second concept's reference evaluation reads no image through the tower
    (its sets are the first one's images), every figure, cached state and search step equals an
    unshared evaluator's, and a model with other weights is refused."""
    from unlearn.eval.suite import SharedBase

    concepts = [Concept("Elon Musk", "identity"), Concept("Taylor Swift", "identity")]
    tasks = [concept_tasks(tiny_world / "eval", c, "val", 0.34, 0) for c in concepts]
    shared = SharedBase()
    reads = []
    hiddens = type(trained).image_hiddens
    monkeypatch.setattr(type(trained), "image_hiddens", lambda self, x, blocks: reads.append(len(x)) or hiddens(self, x, blocks))
    text_reads, text_hiddens = [], type(trained).text_hiddens
    monkeypatch.setattr(type(trained), "text_hiddens", lambda self, t, blocks: text_reads.append(len(t)) or text_hiddens(self, t, blocks))
    layer = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    p = dict(trained.model.named_parameters())[layer]
    original = p.detach().clone()
    for k, t in enumerate(tasks):
        alone, together = Evaluator(trained, t, batch_size=16, chunk_size=4), Evaluator(trained, t, batch_size=16, chunk_size=4, shared=shared)
        reads[:] = text_reads[:] = []
        base = together.evaluate(reference=True)
        assert (sum(reads) > 0) == (k == 0)  # the first concept reads every image once, the second none
        assert any(n > 1 for n in text_reads) == (k == 0)  # and the class prompts' text states (beyond one prompt sizing the cache)
        assert base == alone.evaluate(reference=True)
        for ev in (alone, together):
            ev.prepare(layer)
        assert all(torch.equal(alone._hidden[key], together._hidden[key]) for key in alone._hidden) and alone._hidden.keys() == together._hidden.keys()
        try:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * original.std())
            assert together.evaluate(layer) == alone.evaluate(layer)
        finally:
            with torch.no_grad():
                p.copy_(original)
        # a text edit scores the same
        text = "transformer.resblocks.1.mlp.c_fc.weight"
        q = dict(trained.model.named_parameters())[text]
        q_original = q.detach().clone()
        for ev in (alone, together):
            ev.prepare(text)
        try:
            with torch.no_grad():
                q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(k)) * q_original.std())
            assert together.evaluate(text) == alone.evaluate(text)
        finally:
            with torch.no_grad():
                q.copy_(q_original)
    try:
        with torch.no_grad():
            p.mul_(1.5)
        with pytest.raises(RuntimeError, match="other weights"):
            Evaluator(trained, tasks[0], batch_size=16, shared=shared).evaluate(reference=True)
    finally:
        with torch.no_grad():
            p.copy_(original)
