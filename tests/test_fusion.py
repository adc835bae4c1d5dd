"""MetaFusionLayer / MetaFusionNetwork against a naive reference that builds every W_i explicitly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from models.metammf.fusion import MetaFusionLayer, MetaFusionNetwork, tower_widths

IN, OUT, META, RANK, BATCH = 12, 7, 5, 4, 9


def reference_meta_tensor(layer: MetaFusionLayer) -> Tensor:
    """T (in, out, meta) in float64, built from the parameters without the layer's own code paths."""
    if layer.tensor == "full":
        return layer.meta_tensor.detach().double().clone()
    a = layer.factor_in.detach().double()  # (in, R)
    b = layer.factor_out.detach().double()  # (out, R)
    c = layer.factor_meta.detach().double()  # (meta, R)
    t = torch.zeros(layer.in_dim, layer.out_dim, layer.meta_dim, dtype=torch.float64)
    for r in range(a.shape[1]):  # T = sum_r a_r o b_r o c_r
        t += a[:, r, None, None] * b[None, :, r, None] * c[None, None, :, r]
    return t


def reference_item_weights(layer: MetaFusionLayer, s: Tensor) -> Tensor:
    """W_i = W + T x3 s_i for every row of ``s``: (b, in, out) float64."""
    t = reference_meta_tensor(layer)
    static = (
        layer.weight.detach().double()
        if layer.weight is not None
        else torch.zeros(layer.in_dim, layer.out_dim, dtype=torch.float64)
    )
    mats = []
    for s_i in s.detach().double():
        w_i = static.clone()
        for k in range(layer.meta_dim):
            w_i += t[:, :, k] * s_i[k]
        mats.append(w_i)
    return torch.stack(mats)


def reference_layer(layer: MetaFusionLayer, x: Tensor, s: Tensor) -> Tensor:
    """x_i @ W_i, one item at a time."""
    weights = reference_item_weights(layer, s)
    return torch.stack([x_i.double() @ w_i for x_i, w_i in zip(x, weights, strict=True)])


def make_layer(tensor: str, static: bool, seed: int = 0, **kwargs) -> MetaFusionLayer:
    torch.manual_seed(seed)
    layer = MetaFusionLayer(IN, OUT, META, tensor=tensor, rank=RANK, static_weights=static, **kwargs)
    # Random values everywhere (not just the Xavier init) so no structure hides a bug.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def inputs(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, META, generator=g)


LAYER_KINDS = pytest.mark.parametrize(
    ("tensor", "static"), [("cp", True), ("cp", False), ("full", True), ("full", False)]
)


@LAYER_KINDS
def test_layer_matches_naive_per_item_reference(tensor: str, static: bool) -> None:
    layer = make_layer(tensor, static)
    x, s = inputs()
    out = layer(x, s)
    assert out.shape == (BATCH, OUT)
    torch.testing.assert_close(out.double(), reference_layer(layer, x, s), atol=1e-5, rtol=1e-5)


@LAYER_KINDS
def test_item_weight_matches_reference_and_forward(tensor: str, static: bool) -> None:
    layer = make_layer(tensor, static)
    x, s = inputs()
    w = layer.item_weight(s)
    assert w.shape == (BATCH, IN, OUT)
    torch.testing.assert_close(w.double(), reference_item_weights(layer, s), atol=1e-5, rtol=1e-5)
    via_item_weight = torch.einsum("bi,bio->bo", x, w)
    torch.testing.assert_close(layer(x, s), via_item_weight, atol=1e-5, rtol=1e-5)


@LAYER_KINDS
def test_item_weight_is_affine_in_s(tensor: str, static: bool) -> None:
    layer = make_layer(tensor, static)
    _, s = inputs()
    zero = layer.item_weight(torch.zeros(1, META))[0]
    if static:
        torch.testing.assert_close(zero, layer.weight.detach())
    else:
        assert torch.count_nonzero(zero) == 0
    # W_i - W is linear in s_i.
    lhs = layer.item_weight(2 * s[:2]) - zero
    rhs = 2 * (layer.item_weight(s[:2]) - zero)
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-5)


@LAYER_KINDS
def test_rows_are_independent_of_the_batch(tensor: str, static: bool) -> None:
    layer = make_layer(tensor, static)
    x, s = inputs()
    full = layer(x, s)
    for i in (0, 4, BATCH - 1):
        torch.testing.assert_close(layer(x[i : i + 1], s[i : i + 1])[0], full[i], atol=1e-5, rtol=1e-5)


@LAYER_KINDS
def test_gradients_reach_every_parameter(tensor: str, static: bool) -> None:
    layer = make_layer(tensor, static)
    x, s = inputs()
    s.requires_grad_(True)
    layer(x, s).pow(2).sum().backward()
    names = {name for name, _ in layer.named_parameters()}
    expected = {"factor_in", "factor_out", "factor_meta"} if tensor == "cp" else {"meta_tensor"}
    assert names == expected | ({"weight"} if static else set())
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert s.grad is not None and s.grad.abs().sum() > 0  # the meta information is trained through


def test_gradient_matches_reference_autograd() -> None:
    """Gradients of the contraction equal those of the materialised W_i (CP)."""
    layer = make_layer("cp", True)
    x, s = inputs()
    layer(x, s).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    t = torch.einsum("ir,or,kr->iok", params["factor_in"], params["factor_out"], params["factor_meta"])
    w_items = params["weight"] + torch.einsum("iok,bk->bio", t, s.double())
    torch.einsum("bi,bio->bo", x.double(), w_items).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name].double(), p.grad, atol=1e-4, rtol=1e-5)


def test_unknown_tensor_kind_rejected() -> None:
    with pytest.raises(ValueError, match="tensor"):
        MetaFusionLayer(4, 4, 2, tensor="tucker")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("in_dim", "out_dim", "n_layers", "expected"),
    [
        (256, 32, 1, [256, 32]),
        (256, 32, 2, [256, 128, 32]),
        (2276, 32, 4, [2276, 1024, 512, 256, 32]),
        (256, 32, 3, [256, 128, 64, 32]),
    ],
)
def test_tower_widths(in_dim: int, out_dim: int, n_layers: int, expected: list[int]) -> None:
    assert tower_widths(in_dim, out_dim, n_layers) == expected


@pytest.mark.parametrize(("in_dim", "n_layers"), [(64, 4), (40, 4), (33, 3), (8, 3), (1, 2)])
def test_tower_widths_never_below_out_dim(in_dim: int, n_layers: int) -> None:
    widths = tower_widths(in_dim, 32, n_layers)
    assert len(widths) == n_layers + 1
    assert widths[0] == in_dim and widths[-1] == 32
    assert all(w >= 32 for w in widths[1:])
    assert all(a >= b for a, b in itertools.pairwise(widths[1:]))  # non-increasing


def test_tower_widths_64_to_32() -> None:
    assert tower_widths(64, 32, 4) == [64, 32, 32, 32, 32]


# --------------------------------------------------------------------------------------------------
# MetaFusionNetwork
# --------------------------------------------------------------------------------------------------


def leaky(h: Tensor, slope: float) -> Tensor:
    return torch.where(h > 0, h, slope * h)


def reference_network(net: MetaFusionNetwork, features: Tensor) -> Tensor:
    """Standardise, s_i = MLP(x_i), then h <- LeakyReLU(h_i @ W_i) per item, no activation at the end."""
    x = (features.double() - net.feature_mean.double()) / net.feature_std.double()
    lin1, lin2 = net.extractor[0], net.extractor[2]
    hidden = torch.relu(x @ lin1.weight.detach().double().T + lin1.bias.detach().double())
    s = hidden @ lin2.weight.detach().double().T + lin2.bias.detach().double()
    h = x
    for n, layer in enumerate(net.layers):
        weights = reference_item_weights(layer, s)
        h = torch.stack([h_i @ w_i for h_i, w_i in zip(h, weights, strict=True)])
        if n < len(net.layers) - 1:
            h = leaky(h, net.activation.negative_slope)
    return h


@pytest.mark.parametrize("tensor", ["cp", "full"])
@pytest.mark.parametrize("static", [True, False])
def test_network_matches_reference(tensor: str, static: bool) -> None:
    torch.manual_seed(0)
    net = MetaFusionNetwork(40, fused_dim=8, meta_dim=META, extractor_hidden=16, n_layers=3,
                            tensor=tensor, rank=RANK, static_weights=static, leaky_slope=0.2)  # fmt: skip
    features = 3 * torch.randn(BATCH, 40) + 1
    net.fit_normalization(torch.randn(50, 40) * 2 + 0.5)
    out = net(features)
    assert out.shape == (BATCH, 8)
    assert [(layer.in_dim, layer.out_dim) for layer in net.layers] == [(40, 16), (16, 8), (8, 8)]
    reference = reference_network(net, features)
    # float32 rounding grows over three layers; in float64 the match is exact to 1e-10.
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(net.double()(features.double()), reference, atol=1e-10, rtol=1e-10)


def test_network_has_no_bias_in_tower_and_trains_everything() -> None:
    torch.manual_seed(0)
    net = MetaFusionNetwork(24, fused_dim=8, n_layers=2, extractor_hidden=16)
    tower_names = [name for name, _ in net.layers.named_parameters()]
    assert tower_names and not any("bias" in name for name in tower_names)
    # The only biases are those of the extractor MLP, zero-initialised.
    biases = [name for name, _ in net.named_parameters() if "bias" in name]
    assert sorted(biases) == ["extractor.0.bias", "extractor.2.bias"]
    assert all(torch.count_nonzero(net.extractor[i].bias) == 0 for i in (0, 2))
    net(torch.randn(6, 24)).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _assert_uniform(t: Tensor, bound: float) -> None:
    """Plausibly U(-bound, bound): inside the bound, close to it, std near bound / sqrt(3)."""
    values = t.detach().abs()
    assert values.max() <= bound + 1e-7
    assert values.max() > 0.8 * bound
    assert t.detach().std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_xavier_init_bounds() -> None:
    torch.manual_seed(0)
    gain = 0.5
    net = MetaFusionNetwork(256, fused_dim=32, meta_dim=5, n_layers=2, rank=16, init_gain=gain)
    first, last = net.layers
    assert (first.in_dim, first.out_dim, last.in_dim, last.out_dim) == (256, 128, 128, 32)
    assert first.init_gain == 1.0 and last.init_gain == gain  # only the output layer is scaled

    def xavier(fan_a: int, fan_b: int, g: float = 1.0) -> float:
        return g * math.sqrt(6.0 / (fan_a + fan_b))

    _assert_uniform(first.weight, xavier(256, 128))
    _assert_uniform(last.weight, xavier(128, 32, gain))
    _assert_uniform(first.factor_in, xavier(256, 16))
    _assert_uniform(first.factor_out, xavier(128, 16))
    _assert_uniform(last.factor_out, xavier(32, 16, gain))
    _assert_uniform(last.factor_in, xavier(128, 16))
    # The meta factor (5 x 16) is too small for a std check; check the bound only.
    assert first.factor_meta.abs().max() <= xavier(5, 16) + 1e-7

    full = MetaFusionLayer(64, 32, 4, tensor="full", init_gain=2.0)
    _assert_uniform(full.meta_tensor, xavier(64, 32, 2.0))
    _assert_uniform(full.weight, xavier(64, 32, 2.0))


def test_output_scales_with_init_gain() -> None:
    x = torch.randn(20, 30)
    outs = []
    for gain in (1.0, 0.1):
        torch.manual_seed(3)
        outs.append(MetaFusionNetwork(30, fused_dim=8, n_layers=2, init_gain=gain)(x))
    torch.testing.assert_close(outs[1], 0.1 * outs[0], atol=1e-5, rtol=1e-4)


def test_feature_normalisation_buffers() -> None:
    torch.manual_seed(0)
    features = torch.randn(100, 10) * torch.arange(1, 11) + torch.arange(10)
    features[:, 3] = 7.0  # a constant column must not divide by zero
    net = MetaFusionNetwork(10, fused_dim=4, extractor_hidden=8)
    assert torch.equal(net.feature_mean, torch.zeros(10)) and torch.equal(net.feature_std, torch.ones(10))
    net.fit_normalization(features)
    torch.testing.assert_close(net.feature_mean, features.mean(0))
    expected_std = features.std(0)
    expected_std[3] = 1e-6
    torch.testing.assert_close(net.feature_std, expected_std)
    out = net(features)
    assert torch.isfinite(out).all()
    # The buffers are saved with the weights and give the same fusion after loading.
    state = net.state_dict()
    assert "feature_mean" in state and "feature_std" in state
    fresh = MetaFusionNetwork(10, fused_dim=4, extractor_hidden=8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(features), out)
    # Fitting is equivalent to feeding standardised features to an unfitted copy.
    plain = MetaFusionNetwork(10, fused_dim=4, extractor_hidden=8)
    plain.load_state_dict({**state, "feature_mean": torch.zeros(10), "feature_std": torch.ones(10)})
    torch.testing.assert_close(plain((features - net.feature_mean) / net.feature_std), out)


def test_fusion_is_item_specific() -> None:
    """Items with different content get different effective fusion matrices W_i."""
    torch.manual_seed(0)
    net = MetaFusionNetwork(20, fused_dim=8, meta_dim=5, extractor_hidden=16, n_layers=1)
    features = torch.randn(6, 20)
    x = (features - net.feature_mean) / net.feature_std
    s = net.meta_information(x)
    assert not torch.allclose(s[0], s[1])
    layer = net.layers[0]
    weights = layer.item_weight(s)
    for a in range(6):
        for b in range(a + 1, 6):
            rel = (weights[a] - weights[b]).norm() / weights[a].norm()
            assert rel > 1e-2, (a, b)
    # The output of an item depends on its own s_i: fusing x_0 with another item's s changes it.
    torch.testing.assert_close(net(features[:1])[0], x[0] @ weights[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x[0] @ weights[1], x[0] @ weights[0], atol=1e-3)
    # No single static matrix reproduces all items: least squares over many items leaves a residual.
    feats = torch.randn(200, 20)
    out = net(feats).detach()
    xs = (feats - net.feature_mean) / net.feature_std
    solution = torch.linalg.lstsq(xs, out).solution
    residual = (xs @ solution - out).norm() / out.norm()
    assert residual > 0.05


@pytest.mark.parametrize("tensor", ["cp", "full"])
def test_fusion_shares_split_each_layer_at_the_mean_meta_information(tensor: str) -> None:
    """The static map at mean(s) plus the item-specific rest is the layer's output; a network whose meta tensor
    is zero has no dynamic share, and one without W whose s varies has a positive one."""
    from training.fusion_share import fusion_shares

    torch.manual_seed(0)
    fusion = MetaFusionNetwork(12, fused_dim=4, meta_dim=3, extractor_hidden=8, n_layers=2, tensor=tensor, rank=4)
    x = torch.randn(50, 12)
    shares = fusion_shares(fusion, x)
    assert [s.layer for s in shares] == [1, 2]
    for s in shares:
        assert 0 < s.dynamic_share < 1 and 0 < s.static_share < 1 and s.meta_spread > 0
    # Layer 1 by hand: the energy of out - static over the energy of out.
    layer, meta = fusion.layers[0], fusion.meta_information(x)
    with torch.no_grad():
        out, static = layer(x, meta), layer(x, meta.mean(0, keepdim=True).expand_as(meta))
    assert shares[0].dynamic_share == pytest.approx(float((out - static).pow(2).sum() / out.pow(2).sum()), rel=1e-5)
    with torch.no_grad():
        for layer in fusion.layers:
            for name in ("factor_meta", "meta_tensor"):
                if hasattr(layer, name):
                    getattr(layer, name).zero_()
    assert all(s.dynamic_share == 0 and s.static_share == pytest.approx(1) for s in fusion_shares(fusion, x))
