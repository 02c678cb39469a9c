"""The baselines on a tiny model: each lowers the forget similarity; SalUn never moves a
masked-out coordinate; SSD changes only the coordinates it selects."""

import copy

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.methods import baselines as B
from unlearn.methods import ft, ga, ga_ft, salun, ssd
from unlearn.methods.slug import mean_gradient


@pytest.fixture
def model(tiny_clip):
    return copy.deepcopy(tiny_clip)


def _similarity(adapter, pairs):
    with torch.no_grad():
        return 1.0 - float(adapter.forget_loss(*pairs))


CFG = B.TrainConfig(lr=1e-4, epochs=2, batch_size=16, alpha=1.0)


@pytest.mark.parametrize("method", [ga.gradient_ascent, ga_ft.ga_ft], ids=["ga", "ga_ft"])
def test_ascent_methods_lower_the_forget_similarity(model, data, method):
    forget, retain = data
    before = _similarity(model, forget)
    epochs = []
    method(model, forget, retain, CFG, on_epoch=lambda e: epochs.append(e) or False)
    assert epochs == [0, 1]
    assert _similarity(model, forget) < before - 0.01


def test_finetune_trains_on_the_retain_set_only(model, data):
    """FT forgets only by interference; on this barely trained model it even raises the forget
    similarity (it is still learning), so the test checks its own objective and its data."""
    forget, retain = data
    with torch.no_grad():
        before = float(model.retain_loss(*retain))
    history = ft.finetune(model, forget, retain, B.TrainConfig(lr=2e-4, epochs=3, batch_size=16))
    with torch.no_grad():
        assert float(model.retain_loss(*retain)) < before
    assert len(history) == 3


def test_on_epoch_can_stop_early(model, data):
    forget, retain = data
    history = ga.gradient_ascent(model, forget, retain, CFG, on_epoch=lambda e: True)
    assert len(history) == 1


def test_salun_moves_only_masked_coordinates(model, data):
    forget, retain = data
    grads, _, _ = mean_gradient(model, model.forget_loss, [forget])
    mask = salun.saliency_mask(grads, 0.5)
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    selected = sum(int(m.sum()) for m in mask.values())
    assert 0 < selected <= min(int((flat > 0).sum()), round(0.5 * flat.numel()))
    inside = torch.cat([grads[n].abs()[m] for n, m in mask.items()])
    outside = torch.cat([grads[n].abs()[~m] for n, m in mask.items()])
    assert inside.min() >= outside.max()  # one global threshold over all tensors
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    salun.salun(model, forget, retain, B.TrainConfig(lr=1e-3, epochs=2, batch_size=16, weight_decay=0.1), mask)
    moved = 0
    for n, p in model.model.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
        moved += int((p.detach() != before[n]).sum())
    assert moved > 0  # (its forgetting effect needs a better-trained model: issue 4's comparison)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 1e-9, 1.0])
def test_the_saliency_threshold_is_the_kth_largest_score_over_every_tensor(fraction):
    """Selection gives what a sort gives (ties and several tensors included), for both SalUns."""
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(300, 7, generator=g).round(decimals=1), "b": torch.randn(1001, generator=g).round(decimals=1),
             "c": torch.zeros(5)}
    flat = torch.cat([t.abs().flatten() for t in grads.values()])
    k = max(1, round(fraction * flat.numel()))
    assert salun.saliency_threshold(grads, fraction) == torch.topk(flat, k, sorted=True).values[-1].item()
    assert len(set(flat.tolist())) < flat.numel() / 10  # the case is real: heavy ties


def test_ssd_changes_only_selected_coordinates(model, data):
    forget, retain = data
    imp_f = ssd.squared_gradients(model, model.forget_loss, forget, 16)
    imp_r = ssd.squared_gradients(model, model.retain_loss, retain, 16)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    sim = _similarity(model, forget)
    selected = ssd.ssd(model, imp_f, imp_r, alpha=10.0, dampening=1.0)
    assert selected > 0
    changed = 0
    for n, p in model.model.named_parameters():
        chosen = imp_f[n] > 10.0 * imp_r[n]
        assert torch.equal(p.detach()[~chosen], before[n][~chosen]), n
        assert (p.detach().abs() <= before[n].abs() + 1e-12).all()
        changed += int((p.detach() != before[n]).sum())
    assert 0 < changed <= selected
    assert _similarity(model, forget) < sim


def test_divergence_is_an_error(model, data):
    forget, retain = data
    with torch.no_grad():
        model.model.visual.proj.fill_(float("nan"))
    with pytest.raises(UnlearnError, match="ga diverged"):
        ga.gradient_ascent(model, forget, retain, CFG)
