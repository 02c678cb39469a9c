"""The retain-preconditioned step: the inputs each tensor multiplies, read by hooks, against an
independent route; the preconditioned direction's optimality; its config checks."""

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.methods import slug
from unlearn.models import openclip as oc
from unlearn.models.inputs import input_moments

CAPTIONS = ["Elon Musk at the gala", "a photo of a rocket", "Taylor Swift smiling", "a red car", "Mickey", "a fish", "a tree"]
V, T = "visual.transformer.resblocks.1.", "transformer.resblocks.0."


@pytest.fixture(scope="module")
def adapter():
    a = oc.create(oc.TINY_ARCH, seed=2)
    a.model.eval()
    with torch.no_grad():  # non-trivial LayerNorm affines, so that x_hat differs from the LayerNorm's output
        for name, p in a.model.named_parameters():
            if ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return a


@pytest.fixture(scope="module")
def batches(adapter):
    g = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(len(CAPTIONS), 3, 64, 64, generator=g), adapter.tokenize(CAPTIONS)
    return [(images[:4], tokens[:4]), (images[4:], tokens[4:])]


def _outputs(adapter, batches, module_names):
    """Every output of the named modules over the batches, flattened to (positions, features)."""
    modules = dict(adapter.model.named_modules())
    seen = {n: [] for n in module_names}
    handles = [modules[n].register_forward_hook(lambda _m, _a, out, n=n: seen[n].append(out[0] if isinstance(out, tuple) else out))
               for n in module_names]
    with torch.no_grad():
        for images, tokens in batches:
            adapter.model.encode_image(images)
            adapter.model.encode_text(tokens)
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double() for n, v in seen.items()}


def _second_moment(x):
    return x.T @ x / x.shape[0]


def test_input_moments_match_an_independent_route(adapter, batches):
    layers = [V + "attn.in_proj_weight", V + "attn.out_proj.weight", V + "mlp.c_fc.weight", V + "mlp.c_proj.weight", V + "ln_2.weight",
              T + "attn.out_proj.weight", T + "mlp.c_fc.weight", "visual.proj", "text_projection"]
    moments, count = input_moments(adapter, layers, batches)
    assert count == len(CAPTIONS)
    out = _outputs(adapter, batches, [V + "ln_1", V + "attn", V + "ln_2", V + "mlp.gelu", T + "attn", T + "ln_2"])
    close = dict(rtol=1e-6, atol=1e-9)
    # the attention and the MLP read their LayerNorm's output; c_proj reads the GELU's
    torch.testing.assert_close(moments[V + "attn.in_proj_weight"], _second_moment(out[V + "ln_1"]), **close)
    torch.testing.assert_close(moments[V + "mlp.c_fc.weight"], _second_moment(out[V + "ln_2"]), **close)
    torch.testing.assert_close(moments[V + "mlp.c_proj.weight"], _second_moment(out[V + "mlp.gelu"]), **close)
    torch.testing.assert_close(moments[T + "mlp.c_fc.weight"], _second_moment(out[T + "ln_2"]), **close)
    # LayerNorm weight: x_hat = (output - bias) / weight
    ln = dict(adapter.model.named_modules())[V + "ln_2"]
    x_hat = (out[V + "ln_2"] - ln.bias.double()) / ln.weight.double()
    torch.testing.assert_close(moments[V + "ln_2.weight"], (x_hat**2).mean(0), rtol=1e-5, atol=1e-8)
    # output projection of the attention (causal mask on the text side): y - b = z W^T, so E[(y-b)(y-b)^T] = W C W^T
    for block in (V, T):
        proj = dict(adapter.model.named_modules())[block + "attn"].out_proj
        w, y = proj.weight.double(), out[block + "attn"] - proj.bias.double()
        torch.testing.assert_close(w @ moments[block + "attn.out_proj.weight"] @ w.T, _second_moment(y), rtol=1e-5, atol=1e-8)
    # the towers' projections: the embedding is x @ P, so P^T C P = E[v v^T]
    with torch.no_grad():
        v = torch.cat([adapter.model.encode_image(i) for i, _ in batches]).double()
        t = torch.cat([adapter.model.encode_text(k) for _, k in batches]).double()
    p_v, p_t = adapter.model.visual.proj.double(), adapter.model.text_projection.double()
    torch.testing.assert_close(p_v.T @ moments["visual.proj"] @ p_v, _second_moment(v), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p_t.T @ moments["text_projection"] @ p_t, _second_moment(t), rtol=1e-4, atol=1e-6)
    # the hooks are gone and the weights untouched: the model computes what it computed before
    with torch.no_grad():
        torch.testing.assert_close(adapter.model.encode_image(batches[0][0]).double(), v[:4])


def test_layouts_and_an_unsupported_tensor(adapter):
    assert adapter.input_layout("visual.proj") == "matmul"
    assert adapter.input_layout(V + "attn.in_proj_weight") == adapter.input_layout(V + "mlp.c_proj.weight") == "linear"
    assert adapter.input_layout("ln_final.weight") == "scale"
    with pytest.raises(UnlearnError, match="visual.conv1.weight.*direction=gradient"):
        adapter.input_layout("visual.conv1.weight")


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n) + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 4)  # uneven spectrum


@pytest.mark.parametrize("layout,shape", [("linear", (6, 5)), ("matmul", (5, 6))])
def test_the_preconditioned_direction_gains_most_forget_loss_per_retain_change(layout, shape):
    """Among directions d, the first-order rise of L_f per unit change of the layer's retain
    outputs, <g, d> / sqrt(E||d-applied-to-x||^2 + lam ||d||^2), is highest for the preconditioned
    direction: higher than for g itself and for random directions."""
    c, damping = _spd(5, 0), 0.1
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = c + damping * torch.trace(c) / 5 * torch.eye(5, dtype=torch.float64)

    def gain(d):  # the input side is dim 1 for y = x W^T, dim 0 for y = x @ W
        cost = torch.trace(d @ a @ d.T) if layout == "linear" else torch.trace(d.T @ a @ d)
        return float((g * d).sum() / cost.sqrt())

    d = slug.precondition(g.float(), c, layout, damping).double()
    assert (g * d).sum() > 0  # it still increases L_f
    assert gain(d) > gain(g) * 1.01
    rand = torch.Generator().manual_seed(2)
    assert all(gain(d) >= gain(torch.randn(*shape, generator=rand, dtype=torch.float64)) for _ in range(50))


@pytest.mark.parametrize("layout", ["linear", "matmul"])
def test_the_input_side_matters(layout):
    """On a square tensor both orientations compute; only the layout's own input side is optimal."""
    c, damping = _spd(5, 5), 0.1
    g = torch.randn(5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = c + damping * torch.trace(c) / 5 * torch.eye(5, dtype=torch.float64)

    def gain(d):
        cost = torch.trace(d @ a @ d.T) if layout == "linear" else torch.trace(d.T @ a @ d)
        return float((g * d).sum() / cost.sqrt())

    right = slug.precondition(g, c, layout, damping)
    wrong = slug.precondition(g, c, "matmul" if layout == "linear" else "linear", damping)
    assert gain(wrong) < 0.99 * gain(right)


def test_large_damping_approaches_the_paper_direction():
    c = _spd(5, 3)
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    d = slug.precondition(g, c, "linear", 1e6)
    torch.testing.assert_close(d / d.norm(), g / g.norm(), rtol=1e-4, atol=1e-5)
    s = slug.precondition(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]), "scale", 1e-9)
    torch.testing.assert_close(s, torch.tensor([1.0, 1 / 3]), rtol=1e-6, atol=0)


def test_a_zero_retain_moment_is_an_error():
    with pytest.raises(UnlearnError, match="zero or non-finite second moment"):
        slug.precondition(torch.ones(3, 2), torch.zeros(2, 2), "linear", 0.1)


@pytest.mark.parametrize("values,match", [({"direction": "retain"}, "direction is .retain.; known: gradient, retain_preconditioned"),
                                          ({"damping": 0.0}, "damping must be a number > 0")])
def test_search_config_rejects_bad_direction_settings(values, match):
    with pytest.raises(UnlearnError, match=match):
        slug.SearchConfig(**values)


def test_step_directions_use_the_retain_moments_only_when_asked(adapter, batches):
    images, tokens = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    g_f, _, _ = slug.mean_gradient(adapter, adapter.forget_loss, [(images, tokens)])
    layers = ["visual.proj", V + "mlp.c_fc.weight"]
    plain = slug.step_directions(adapter, g_f, layers, slug.SearchConfig(direction="gradient"), None)
    assert all(plain[n] is g_f[n] for n in layers)
    cfg = slug.SearchConfig(direction="retain_preconditioned", damping=0.1)
    with pytest.raises(UnlearnError, match="no input moments of"):
        slug.step_directions(adapter, g_f, layers, cfg, {})
    moments, _ = input_moments(adapter, layers, iter(batches))
    pre = slug.step_directions(adapter, g_f, layers, cfg, moments)
    for n in layers:
        assert pre[n].shape == g_f[n].shape and (pre[n] * g_f[n]).sum() > 0
        assert float(torch.nn.functional.cosine_similarity(pre[n].flatten(), g_f[n].flatten(), dim=0)) < 0.999


def test_the_rows_layout_is_matmul_with_one_hot_inputs():
    """An embedding table (`rows`) is y = x @ W with one-hot x: its preconditioned direction is the
    `matmul` one with C = diag(token frequencies), row by row, and a row no input holds moves by
    g / lam (the damping alone)."""
    freq = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0], dtype=torch.float64)
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = slug.precondition(g, freq, "rows", 0.1)
    torch.testing.assert_close(rows, slug.precondition(g, torch.diag(freq), "matmul", 0.1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows[3], g[3] / (0.1 * freq.mean()))
    assert (g * rows).sum() > 0
    with pytest.raises(UnlearnError, match="zero or non-finite second moment"):
        slug.precondition(g, torch.zeros(5, dtype=torch.float64), "rows", 0.1)


def test_input_moments_of_the_token_embedding_are_the_token_frequencies(adapter, batches):
    """The token embedding's input is the token ids: its moment is each token's share of every
    position (padding included), counted independently of the hooks, for both families."""
    from unlearn.models.export import to_hf_clip

    for model, name in ((adapter, "token_embedding.weight"), (to_hf_clip(adapter), "text_model.embeddings.token_embedding.weight")):
        assert model.input_layout(name) == "rows"
        images, tokens = torch.cat([i for i, _ in batches]), model.tokenize(CAPTIONS)
        moments, count = input_moments(model, [name], [(images[:4], tokens[:4]), (images[4:], tokens[4:])])
        vocab = dict(model.model.named_parameters())[name].shape[0]
        expected = torch.bincount(tokens.flatten(), minlength=vocab).double() / tokens.numel()
        assert count == len(CAPTIONS) and moments[name].shape == (vocab,)
        torch.testing.assert_close(moments[name], expected, rtol=0, atol=0)
