"""The contract every registered model family meets (the adapter protocol, unlearn/models/adapter.py):
one test class parametrised by family, on tiny models.  A new family registers itself in
`FAMILIES` and a tiny model in `TINY` below, and gets every test here.

The tiny models are the session's trained tiny CLIP (tests/conftest.py) as each family holds it:
open_clip itself, hf_clip its transformers export (the same weights)."""

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import direct_gradient
from unlearn.data.curate import Concept
from unlearn.errors import UnlearnError
from unlearn.eval.suite import Evaluator, concept_tasks
from unlearn.methods import slug
from unlearn.methods.retain_stats import compute_retain_stats
from unlearn.models import adapter as A
from unlearn.models.export import to_hf_clip
from unlearn.models.inputs import input_moments

TINY = {
    "open_clip": lambda base: copy.deepcopy(base),
    "hf_clip": lambda base: to_hf_clip(copy.deepcopy(base)),
}
# tensors whose inputs a family reads through its own route (not an nn.Linear / nn.LayerNorm
# input): checked against an independent computation in the family's own test
OWN_ROUTE_TESTS = {"open_clip": "tests/test_inputs.py::test_input_moments_match_an_independent_route"}
CAPTIONS = ["Elon Musk at the gala", "a photo of a rocket", "Taylor Swift smiling", "a red car", "Mickey", "a fish", "a tree"]


def test_every_registered_family_has_a_tiny_model():
    assert set(TINY) == set(A.FAMILIES)


@pytest.fixture(scope="module", params=sorted(A.FAMILIES))
def model(request, tiny_clip):
    a = TINY[request.param](tiny_clip)
    assert a.family == request.param
    return a


@pytest.fixture(scope="module")
def batch(model):
    g = torch.Generator().manual_seed(0)
    size = model.preprocess(Image.new("RGB", (64, 64))).shape[-1]
    return torch.randn(len(CAPTIONS), 3, size, size, generator=g), model.tokenize(CAPTIONS)


def _restore(model, name, value):
    with torch.no_grad():
        dict(model.model.named_parameters())[name].copy_(value)


def test_inputs_and_encoders(model, batch):
    images, tokens = batch
    pixel = model.preprocess(Image.fromarray((np.random.default_rng(0).random((80, 64, 3)) * 255).astype("uint8")))
    assert pixel.ndim == 3 and pixel.shape[0] == 3 and pixel.dtype == torch.float32
    assert tokens.dtype == torch.long and tokens.ndim == 2 and tokens.shape[0] == len(CAPTIONS) and tokens.device.type == "cpu"
    with torch.no_grad():
        v, t = model.encode_images(images), model.encode_tokens(tokens)
        assert v.shape == (len(CAPTIONS), t.shape[1])
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(len(CAPTIONS)))
        torch.testing.assert_close(model.encode_texts(CAPTIONS), t)
        assert not torch.allclose(model.encode_images(images, normalize=False).norm(dim=-1), torch.ones(len(CAPTIONS)))
    assert model.logit_scale.item() == pytest.approx(model.logit_scale_param.exp().item()) and model.logit_scale.item() > 1


def test_losses_are_finite_and_meaningful(model, batch):
    images, tokens = batch
    with torch.no_grad():
        f, r = model.forget_loss(images, tokens), model.retain_loss(images, tokens)
        shuffled = model.forget_loss(images, tokens.roll(1, dims=0))
    assert torch.isfinite(f) and torch.isfinite(r) and 0 <= f.item() <= 2 and r.item() > 0
    assert shuffled.item() != pytest.approx(f.item())  # the loss pairs each image with its own caption


def test_the_one_pass_gradient_equals_the_full_batch_gradient(model, batch):
    images, tokens = batch
    batches = [(images[s : s + 3], tokens[s : s + 3]) for s in range(0, len(CAPTIONS), 3)]
    # the forget loss is a mean over pairs: the batched pass is the full-batch gradient
    grads, n, _ = slug.mean_gradient(model, model.forget_loss, batches)
    direct = direct_gradient(model, model.forget_loss, images, tokens)
    assert n == len(CAPTIONS) and set(direct) <= set(grads)
    for k, g in direct.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6)
    # the contrastive retain loss is per batch: the pass is the size-weighted mean of the batches' gradients
    grads, _, _ = slug.mean_gradient(model, model.retain_loss, batches)
    parts = [(direct_gradient(model, model.retain_loss, x, t), x.shape[0]) for x, t in batches]
    for k in direct:
        torch.testing.assert_close(grads[k], sum(g[k] * b for g, b in parts) / len(CAPTIONS), rtol=1e-4, atol=1e-6)



def test_candidates_towers_and_names(model):
    cands = model.candidate_layers()
    params = dict(model.model.named_parameters())
    assert cands and all(params[n].ndim >= 2 for n in cands)
    assert not any(("embedding" in n) or n.endswith("bias") or "logit_scale" in n for n in cands)
    assert {model.tower(n) for n in cands} == set(model.towers)
    with_norms = model.candidate_layers(include_layernorm=True)
    norms = [n for n in with_norms if n not in cands]
    assert norms and all(params[n].ndim == 1 and model.input_layout(n) == "scale" for n in norms)
    assert len({model.short_name(n) for n in with_norms}) == len(with_norms)  # labels tell tensors apart
    assert all(model.input_layout(n) in A.LAYOUTS for n in cands)


def test_cached_partial_forwards_equal_the_full_forward_after_an_edit_in_each_tower(model, batch):
    """What the evaluator's caches rely on: hidden states cached before an edit of vision block b,
    resumed at b after it, give the full forward of the edited model; a text-tower edit leaves the
    image embeddings alone."""
    images, _ = batch
    cands = model.candidate_layers()
    for tower in model.towers:
        name = next(n for n in cands if model.tower(n) == tower and (tower == "text" or model.image_block_of(n) not in (None, 0)))
        param = dict(model.model.named_parameters())[name]
        original = param.detach().clone()
        block = model.image_block_of(name)
        try:
            with torch.no_grad():
                before = model.encode_images(images)
                hidden = model.image_hidden(images, block) if block is not None else None
                param.add_(0.5 * original.std() * torch.randn_like(param))
                after = model.encode_images(images)
                resumed = model.encode_images_from(hidden, block) if block is not None else None
        finally:
            _restore(model, name, original)
        if tower == "image":
            assert not torch.allclose(before, after)
            torch.testing.assert_close(resumed, after, rtol=1e-5, atol=1e-6)
        else:
            assert block is None and torch.equal(before, after)


def test_every_block_resumes_to_the_full_forward(model, batch):
    images, _ = batch
    image_blocks = sorted({b for n in model.candidate_layers() if (b := model.image_block_of(n)) is not None})
    with torch.no_grad():
        full = model.encode_images(images)
        for b in image_blocks:
            torch.testing.assert_close(model.encode_images_from(model.image_hidden(images, b), b), full, rtol=1e-5, atol=1e-6)


def test_one_pass_hidden_states_are_each_blocks_own_bit_for_bit(model, batch):
    """`image_hiddens` (the evaluator's one-pass cache) gives exactly what `image_hidden` gives
    block by block, for every block and for a subset; the family's own override, not the
    protocol's per-block default; resumed from the last block, it gives `encode_images` bit for
    bit (the evaluator takes the unedited embeddings from that pass)."""
    images, _ = batch
    blocks = sorted({b for n in model.candidate_layers(include_layernorm=True) if (b := model.image_block_of(n)) is not None})
    assert type(model).image_hiddens is not A.Adapter.image_hiddens
    with torch.no_grad():
        for wanted in (blocks, blocks[1:-1], blocks[:1]):
            got = model.image_hiddens(images, wanted)
            assert sorted(got) == sorted(wanted)
            for b in wanted:
                assert torch.equal(got[b], model.image_hidden(images, b)), b
        assert model.image_hiddens(images, []) == {}
        # the evaluator's reference embeddings come from the last state: the full forward's bits
        last = blocks[-1]
        assert torch.equal(model.encode_images_from(model.image_hiddens(images, blocks)[last], last), model.encode_images(images))
    with pytest.raises(ValueError, match="out of"):
        model.image_hiddens(images, [blocks[-1] + 1])


def _text_blocks(model) -> list[int]:
    return sorted({b for n in model.candidate_layers(include_layernorm=True) if (b := model.text_block_of(n)) is not None})


def test_text_states_resume_to_the_full_forward_bit_for_bit(model, batch):
    """The evaluator's text cache: every text candidate of a registered family has a block, no
    image tensor has one; `text_hiddens` reads every block asked for in one pass, each the same
    bits whatever else is asked; resumed from any block, the prompts' embeddings are
    `encode_tokens`' bits (the evaluator takes the unedited class embeddings from the last)."""
    _, tokens = batch
    cands = model.candidate_layers(include_layernorm=True)
    assert all(model.text_block_of(n) is not None for n in cands if model.tower(n) == "text")
    assert all(model.text_block_of(n) is None for n in cands if model.tower(n) == "image")
    blocks = _text_blocks(model)
    assert blocks == list(range(blocks[-1] + 1)) and len(blocks) > 2  # every block, and the head (final norm, projection)
    with torch.no_grad():
        full, every = model.encode_tokens(tokens), model.text_hiddens(tokens, blocks)
        assert sorted(every) == blocks and model.text_hiddens(tokens, []) == {}
        for wanted in (blocks[1:-1], blocks[:1], blocks[-1:]):
            got = model.text_hiddens(tokens, wanted)
            assert sorted(got) == wanted and all(torch.equal(got[b], every[b]) for b in wanted)
        for b in blocks:
            assert every[b].shape[0] == len(CAPTIONS)  # batch first
            assert torch.equal(model.encode_tokens_from(every[b], b, tokens), full), b
        assert not torch.equal(every[0], every[1])
    with pytest.raises(ValueError, match="out of"):
        model.text_hiddens(tokens, [blocks[-1] + 1])


def test_text_states_read_before_an_edit_resume_to_the_edited_forward(model, batch):
    """Per text block, an edit of one of its tensors: the states read before the edit, resumed
    at that block after it, give the edited model's full forward bit for bit (and not the
    unedited one's)."""
    _, tokens = batch
    cands = [n for n in model.candidate_layers() if model.tower(n) == "text"]
    params = dict(model.model.named_parameters())
    with torch.no_grad():
        before = model.encode_tokens(tokens)
        states = model.text_hiddens(tokens, _text_blocks(model))
    for b in _text_blocks(model):
        name = next(n for n in cands if model.text_block_of(n) == b)
        original = params[name].detach().clone()
        try:
            with torch.no_grad():
                params[name].add_(0.5 * original.std() * torch.randn(original.shape, generator=torch.Generator().manual_seed(b)))
                after, resumed = model.encode_tokens(tokens), model.encode_tokens_from(states[b], b, tokens)
        finally:
            _restore(model, name, original)
        assert not torch.allclose(after, before), name
        assert torch.equal(resumed, after), name


def test_chunks_give_the_bits_of_one_batch(model):
    """The evaluator reads the one-pass cache and runs cached states through the rest of the
    tower in equal chunks of at most `CHUNK_CPU` images (`Evaluator._chunks`): per image the same
    bits as in one batch, for every block, and so in chunks of the images in another order (the
    evaluator scores a set it may give up hardest images first): the search's figures must not
    depend on the chunking or the order."""
    from unlearn.eval.suite import CHUNK_CPU

    size = model.preprocess(Image.new("RGB", (64, 64))).shape[-1]
    n = 2 * CHUNK_CPU + 5
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    blocks = sorted({b for n in model.candidate_layers(include_layernorm=True) if (b := model.image_block_of(n)) is not None})
    k = -(-n // CHUNK_CPU)
    with torch.no_grad():
        states = model.image_hiddens(images, blocks)
        parts = [model.image_hiddens(x, blocks) for x in torch.tensor_split(images, k)]
        for b in blocks:
            assert torch.equal(torch.cat([p[b] for p in parts]), states[b]), b
            whole = model.encode_images_from(states[b], b)
            chunks = torch.tensor_split(states[b], k)
            assert min(len(c) for c in chunks) > CHUNK_CPU // 2
            assert torch.equal(torch.cat([model.encode_images_from(c, b) for c in chunks]), whole), b
            order = torch.randperm(n, generator=torch.Generator().manual_seed(b))
            shuffled = torch.cat([model.encode_images_from(c, b) for c in torch.tensor_split(states[b][order], k)])
            assert torch.equal(shuffled[torch.argsort(order)], whole), b


def test_input_moments_of_linear_and_layernorm_candidates(model, batch):
    """Against an independent route: forward hooks on each owning module's *output* (y = x W^T + b,
    so E[(y - b)(y - b)^T] = W C W^T; a LayerNorm's x_hat = (y - b) / w).  Tensors whose module
    never runs as a module (open_clip's fused attention) are read by the family's own route,
    checked in the family's own test."""
    images, tokens = batch
    modules = dict(model.model.named_modules())
    cands = [n for n in model.candidate_layers(include_layernorm=True) if isinstance(modules.get(n.rpartition(".")[0]), (nn.Linear, nn.LayerNorm))]
    seen = {n: [] for n in cands}
    handles = [modules[n.rpartition(".")[0]].register_forward_hook(lambda _m, _a, out, n=n: seen[n].append(out)) for n in cands]
    try:
        with torch.no_grad():
            model.encode_images(images[:4]), model.encode_tokens(tokens[:4])
            model.encode_images(images[4:]), model.encode_tokens(tokens[4:])
    finally:
        for h in handles:
            h.remove()
    own = [n for n in model.candidate_layers() if n not in cands or not seen[n]]
    assert not own or model.family in OWN_ROUTE_TESTS, f"{model.family}: {own[:3]} need an independent route of their own"
    chosen: dict = {}
    for n in cands:
        if seen[n]:
            chosen.setdefault((model.tower(n), type(modules[n.rpartition(".")[0]]).__name__, tuple(modules[n.rpartition(".")[0]].weight.shape)), n)
    layers = list(chosen.values())
    assert len(layers) >= 4
    moments, count = input_moments(model, layers, [(images[:4], tokens[:4]), (images[4:], tokens[4:])])
    assert count == len(CAPTIONS)
    for n in layers:
        owner = modules[n.rpartition(".")[0]]
        y = torch.cat([o.reshape(-1, o.shape[-1]) for o in seen[n]]).double()
        if owner.bias is not None:
            y = y - owner.bias.double()
        w = owner.weight.double()
        if isinstance(owner, nn.LayerNorm):
            torch.testing.assert_close(moments[n], ((y / w) ** 2).mean(0), rtol=1e-5, atol=1e-8)
        else:
            expected = y.T @ y / y.shape[0]  # float32 moments: rounding relative to the matrix's scale, not each entry's
            torch.testing.assert_close(w @ moments[n] @ w.T, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_input_moments_stop_each_tower_after_its_deepest_asked_tensor(model, batch):
    """A tower's forward stops once every asked tensor has reported its input: the moments of the
    first block's tensors are bit for bit those read in a forward that runs to the projection, and
    the later blocks never run."""
    images, tokens = batch
    batches = [(images[:4], tokens[:4]), (images[4:], tokens[4:])]
    cands = model.candidate_layers()
    for tower in ("image", "text"):
        mine = [n for n in cands if model.tower(n) == tower]
        first = [n for n in mine if re.search(r"\.0\.", n)]
        last = mine[-1]  # the projection, read where the tower's forward ends
        assert first and not re.search(r"\.0\.", last), (tower, mine)
        shallow, n_shallow = input_moments(model, first, batches)
        whole, n_whole = input_moments(model, [*first, last], batches)
        assert n_shallow == n_whole == len(CAPTIONS)
        for n in first:
            assert torch.equal(shallow[n], whole[n]), n
        later = [m for name, m in model.model.named_modules() if re.search(r"\.1$", name) and any(p.startswith(name + ".") for p in mine)]
        assert later, tower
        ran: list[int] = []
        handles = [m.register_forward_pre_hook(lambda *_, ran=ran: ran.append(1)) for m in later]
        try:
            input_moments(model, first, batches)
            assert not ran, f"{model.family} {tower}: blocks after the asked ones ran"
            input_moments(model, [*first, last], batches)
            assert ran, f"{model.family} {tower}: the whole forward never reached block 1"
        finally:
            for h in handles:
                h.remove()


def test_save_load_round_trip(model, batch, tmp_path):
    images, tokens = batch
    model.save(tmp_path / "m")
    info = A.read_family(tmp_path / "m")
    assert info["family"] == model.family and info["version"] and info["weights"] == list(model.weights)
    loaded = A.load(tmp_path / "m")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(images), model.encode_images(images))
        assert torch.equal(loaded.encode_tokens(loaded.tokenize(CAPTIONS)), model.encode_tokens(tokens))
    assert len(A.fingerprint(tmp_path / "m")) == 64
    loaded.save(tmp_path / "again")
    assert A.fingerprint(tmp_path / "again") == A.fingerprint(tmp_path / "m")  # same weights, same fingerprint
    name = loaded.candidate_layers()[0]
    with torch.no_grad():
        dict(loaded.model.named_parameters())[name].add_(1e-3)
    loaded.save(tmp_path / "edited")
    assert A.fingerprint(tmp_path / "edited") != A.fingerprint(tmp_path / "m")  # any edit changes it


def test_a_slug_search_on_the_tiny_world(model, data, tiny_world):
    """SLUG end to end through the protocol: gradients, ranking, search and the edit; only the
    chosen tensor moves and the forget loss rises."""
    forget, retain = data
    if model.family != "open_clip":  # the fixture's pairs were made with open_clip's preprocessing and tokenizer
        forget, retain = _retokenized(model, forget, retain, tiny_world)
    musk = Concept("Elon Musk", "identity", ("Musk",), ("Musk ox",))
    evaluator = Evaluator(model, concept_tasks(tiny_world / "eval", musk, "val", 0.34, 0), 64, chunk_size=8)  # chunks of 8: the retain set given up early
    state = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    cfg = slug.SearchConfig(max_layers=2, evals_per_layer=3, rho_max=1.6)
    try:
        with torch.no_grad():
            before = float(model.forget_loss(*forget))
        stats = compute_retain_stats(model, lambda: iter([retain]))
        assert set(stats.moments) == set(model.candidate_layers(True)) and stats.n_retain == retain[0].shape[0]
        # scoring only the decisions chooses what scoring every step on every set chooses
        full, _ = slug.find_edit(model, lambda: iter([forget]), stats, evaluator, "identity", slug.RankConfig(),
                                 dataclasses.replace(cfg, evaluate="all"))
        edit, times = slug.unlearn(model, lambda: iter([forget]), stats, evaluator, "identity", slug.RankConfig(), cfg)
        assert (edit.layer, edit.rho, edit.converged) == (full.layer, full.rho, full.converged) and torch.equal(edit.delta, full.delta)
        assert edit.times["evals_guard"] < full.times["evals_guard"] and edit.times["evals_forget"] == full.times["evals_forget"]
        assert [r["rho"] for r in edit.rows] == [r["rho"] for r in full.rows]
        after_params = dict(model.model.named_parameters())
        moved = [n for n, p in after_params.items() if not torch.equal(p.detach(), state[n])]
        assert moved == [edit.layer] and edit.layer in model.candidate_layers()
        assert len(edit.layers) == 2 and {r["layer"] for r in edit.rows} == set(edit.layers) and times["unlearn"] > 0
        with torch.no_grad():
            assert float(model.forget_loss(*forget)) > before
    finally:
        with torch.no_grad():
            for n, p in model.model.named_parameters():
                p.copy_(state[n])


def _retokenized(model, forget, retain, tiny_world):
    from unlearn.data.pairs import decode
    from unlearn.data.shards import iter_samples

    musk = Concept("Elon Musk", "identity", ("Musk",), ("Musk ox",))
    sides = ([], []), ([], [])
    for s in iter_samples(tiny_world / "laion"):
        side = sides[0] if musk.mentioned_in(s.caption) else sides[1]
        side[0].append(model.preprocess(decode(s, tiny_world / "laion")))
        side[1].append(s.caption)
    return tuple((torch.stack(x), model.tokenize(c)) for x, c in sides)


def test_one_tower_ranking(model):
    g = {n: torch.randn_like(p) for n, p in model.model.named_parameters()}
    for tower in model.towers:
        ranking = slug.rank(model, g, {n: torch.randn_like(v) for n, v in g.items()}, slug.RankConfig(towers=[tower]))
        assert list(ranking.order) == [tower] and all(model.tower(n) == tower for n in ranking.order[tower])
        assert slug.plan_layers(ranking.front_scores(), ranking.order, 3) == ranking.order[tower][:3]
    with pytest.raises(UnlearnError, match=r"slug.rank.towers is \['audio'\]"):
        slug.rank(model, g, g, slug.RankConfig(towers=["audio"]))
