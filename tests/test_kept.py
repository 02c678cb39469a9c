"""The kept moments (unlearn/methods/kept.py): the retain moments pooled with those of every
other concept of the table, computed once per model (stage `concept_moments`), saved with hashes,
refused for another model or when corrupted, and matched to the target's own forget pairs; the
search reads them for the layers it plans only.  The stage runs in tests/test_pipeline.py."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.methods import kept as kept_files
from unlearn.methods.kept import KeptMoments, compute_table_moments, load_table_moments, moments_without, pool_moments, save_table_moments
from unlearn.methods.retain_stats import RetainStats
from unlearn.methods.slug import SearchConfig, find_edit, step_directions
from unlearn.models.inputs import input_moments

CAPTIONS = ["Elon Musk at the gala", "a photo of a rocket", "Taylor Swift smiling", "a red car", "Mickey", "a fish", "a tree"]


def _pairs(tiny_clip):
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(CAPTIONS), 3, 64, 64, generator=g), tiny_clip.tokenize(CAPTIONS)


def test_pooled_moments_are_the_moments_of_the_union(tiny_clip):
    """`pool_moments` (the kept mode): the retain moments pooled with the kept concepts' by pair
    counts equal the moments over the union of both sets' pairs, for every candidate tensor
    (text tensors read every token position, so each pair gives a tensor the same rows)."""
    images, tokens = _pairs(tiny_clip)
    layers = tiny_clip.candidate_layers(include_layernorm=True)
    retain, n_r = input_moments(tiny_clip, layers, [(images[:2], tokens[:2])])
    kept, n_k = input_moments(tiny_clip, layers, [(images[2:], tokens[2:])])
    union, n = input_moments(tiny_clip, layers, [(images, tokens)])
    assert (n_r, n_k, n) == (2, 5, 7)
    pooled = pool_moments(retain, n_r, kept, n_k)
    assert pooled.keys() == union.keys()
    for name in layers:
        torch.testing.assert_close(pooled[name], union[name], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(retain[layers[0]], union[layers[0]])  # pooling did change them
    with pytest.raises(ValueError, match="same tensors"):
        pool_moments(retain, n_r, {k: v for k, v in kept.items() if k != layers[0]}, n_k)
    # and back: the union less one part gives the other part's moments (bench/kept_moments.py's kept set)
    rest = moments_without(union, n, retain, n_r)
    for name in layers:
        torch.testing.assert_close(rest[name], kept[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="a part of the pairs"):
        moments_without(union, n, retain, n)
    # KeptMoments: one pass over every concept's pairs, then each removal costs a pass over its own
    table = KeptMoments(tiny_clip, layers, {"a": (images[:2], tokens[:2]), "b": (images[2:4], tokens[2:4]), "c": (images[4:], tokens[4:])}, 3)
    assert table.n_every == 7
    for names, lo, hi in ((["a"], 2, 7), (["b", "c"], 0, 2)):
        left, n_left = table.without(names)
        alone, n_alone = input_moments(tiny_clip, layers, [(images[lo:hi], tokens[lo:hi])])
        assert n_left == n_alone
        for name in layers:
            torch.testing.assert_close(left[name], alone[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no pairs for"):
        table.without(["d"])



def test_table_moments_round_trip_and_give_each_concept_its_kept_moments(tiny_clip, tmp_path):
    """The table's moments saved and loaded bit for bit; a concept's kept moments are the retain
    moments pooled with the moments of every other concept's pairs (read for the asked layers
    only); a forget set that is not the concept's own pairs, a concept the table lacks, another
    model, a corrupted or missing file: one-line errors naming the fix."""
    images, tokens = _pairs(tiny_clip)
    layers = tiny_clip.candidate_layers(include_layernorm=True)
    per = {"a": (images[:2], tokens[:2]), "b": (images[2:4], tokens[2:4]), "c": (images[4:], tokens[4:])}
    retain_pairs = (images.flip(0)[:3] * 0.5, tokens.flip(0)[:3])
    retain, n_r = input_moments(tiny_clip, layers, [retain_pairs])
    stats = RetainStats({}, retain, n_r, 0.0)  # the moments half of the retain statistics
    table = compute_table_moments(tiny_clip, layers, per, 3)
    assert table.n_every == 7 and {n: c["pairs"] for n, c in table.concepts.items()} == {"a": 2, "b": 2, "c": 3}
    tiny_clip.save(tmp_path / "model")
    out = tmp_path / "moments"
    out.mkdir()
    save_table_moments(out, table, tmp_path / "model", tiny_clip.family, 3)
    back = load_table_moments(out, tmp_path / "model")
    assert back.n_every == 7 and back.concepts == table.concepts and all(torch.equal(back.every[n], table.every[n]) for n in layers)

    asked = [layers[0], layers[-1]]
    source = back.kept_source(tiny_clip, stats, "b", per["b"], 3)
    kept = source(asked)
    others, n_o = input_moments(tiny_clip, asked, [(torch.cat([images[:2], images[4:]]), torch.cat([tokens[:2], tokens[4:]]))])
    assert set(kept) == set(asked)
    want = pool_moments({n: retain[n] for n in asked}, n_r, others, n_o)
    for n in asked:
        torch.testing.assert_close(kept[n], want[n], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(kept[n], retain[n])  # the table's pairs did move them
    # the preconditioned directions read the source for the layers asked, as they would a dict
    grads = {n: torch.randn_like(dict(tiny_clip.model.named_parameters())[n]) for n in asked}
    cfg = SearchConfig(moments="kept")
    lazy, eager = step_directions(tiny_clip, grads, asked, cfg, source), step_directions(tiny_clip, grads, asked, cfg, kept)
    assert all(torch.equal(lazy[n], eager[n]) for n in asked)

    with pytest.raises(UnlearnError, match="the forget set of b is not the pair set the concept moments hold for it.*concept_moments"):
        back.kept_source(tiny_clip, stats, "b", per["a"], 3)
    with pytest.raises(UnlearnError, match="hold no pairs of 'd'.*concept_moments"):
        back.kept_source(tiny_clip, stats, "d", per["a"], 3)
    side = json.loads((out / kept_files.SIDECAR).read_text())
    (out / kept_files.SIDECAR).write_text(json.dumps(side | {"model_sha256": "0" * 64}))
    with pytest.raises(UnlearnError, match="another model.*concept_moments"):
        load_table_moments(out, tmp_path / "model")
    (out / kept_files.SIDECAR).write_text("{}")
    with pytest.raises(UnlearnError, match="not a concept moments record"):
        load_table_moments(out, tmp_path / "model")
    (out / kept_files.SIDECAR).write_text(json.dumps(side))
    data = bytearray((out / kept_files.MOMENTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / kept_files.MOMENTS).write_bytes(bytes(data))
    with pytest.raises(UnlearnError, match="does not match the hash in its sidecar.*concept_moments"):
        load_table_moments(out, tmp_path / "model")
    (out / kept_files.MOMENTS).unlink()
    with pytest.raises(UnlearnError, match="concept moments missing"):
        load_table_moments(out, tmp_path / "model")


def test_the_moments_setting_is_checked(tiny_clip):
    with pytest.raises(UnlearnError, match="slug.search.moments is 'pooled'; use shared .* or kept"):
        SearchConfig(moments="pooled")
    with pytest.raises(UnlearnError, match="moments is kept.*direction is gradient"):
        SearchConfig(moments="kept", direction="gradient")
    with pytest.raises(UnlearnError, match="moments is kept but no concept moments were given.*concept_moments"):
        find_edit(tiny_clip, lambda: [], None, None, "identity", None, SearchConfig(moments="kept"))
