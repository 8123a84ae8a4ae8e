"""Bound propagation: the traced chain computes the model, each affine layer's backward is its transpose,
and IBP, CROWN, CROWN-IBP and α-CROWN are sound — every sampled input's outputs lie inside the bounds, on
random networks and regions — with α-CROWN never looser than CROWN, and CROWN exact where no neuron is
unstable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.bounds import activation_bounds, alpha_crown, compute_bounds, crown, ibp, relaxation
from safetylab.verify.network import trace
from safetylab.verify.regions import box, check_spec, l2_ball, linf_ball, margin_spec


def conv_net(seed: int, channels: int = 3, slope: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), act, nn.Conv2d(channels, 4, 4, stride=2, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    bn = net[3]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-2.0, 2.0)
    return net.eval()


def mlp(seed: int, widths: tuple[int, ...], slope: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(slope) if slope else nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).eval()


def samples(region, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of each example's region, ``(B, n, *shape)``: the box's corners and interior, pulled
    into the L2 ball where there is one."""
    lower, upper = region.lower.unsqueeze(1), region.upper.unsqueeze(1)
    u = torch.rand(region.batch, n, *region.input_shape, generator=generator)
    u[:, : n // 4] = u[:, : n // 4].round()  # corners, where linear pieces take their extremes
    x = lower + u * (upper - lower)
    if region.center is not None:
        center = region.center.unsqueeze(1)
        d = (x - center).flatten(2)
        scale = (region.radius / d.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        x = center + (d * scale).reshape(x.shape)
    return x


def spec_values(model, spec, x) -> torch.Tensor:
    b, n = x.shape[:2]
    with torch.no_grad():
        out = model(x.reshape(b * n, *x.shape[2:])).reshape(b, n, -1)
    return torch.einsum("bsk,bnk->bns", spec, out)


# ----------------------------------------------------------------------------- the traced chain


def test_trace_computes_the_model_and_backward_is_the_transpose():
    for model, shape in ((conv_net(0, slope=0.1), (1, 8, 8)), (mlp(1, (12, 7, 6, 3)), (12,))):
        layers = trace(model, shape)
        x = torch.rand(4, *shape)
        h = x
        for layer in layers:
            h = layer.forward(h)
        assert torch.allclose(h, model(x), atol=1e-5)
        h = x
        for layer in layers:
            if not layer.is_activation:  # <A, W h> = <A W, h>, and the bias term is A · layer(0)
                a = torch.randn(4, 3, *layer.out_shape)
                zero = layer.forward(torch.zeros(1, *layer.in_shape))
                linear = layer.forward(h) - zero
                lhs = (a * linear.unsqueeze(1)).flatten(2).sum(-1)
                rhs = (layer.backward(a) * h.unsqueeze(1)).flatten(2).sum(-1)
                assert torch.allclose(lhs, rhs, atol=1e-4)
                assert torch.allclose(layer.bias_term(a), (a * zero.unsqueeze(1)).flatten(2).sum(-1), atol=1e-5)
                r = torch.rand_like(h)
                w = torch.autograd.functional.jacobian(lambda v, f=layer.forward: f(v.unsqueeze(0))[0], h[0])
                expected = w.abs().reshape(layer.forward(h).shape[1:].numel(), -1) @ r[0].reshape(-1)
                assert torch.allclose(layer.forward_abs(r)[0].reshape(-1), expected, atol=1e-5)
            h = layer.forward(h)


def test_functional_calls_trace_too():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(F.leaky_relu(self.a(torch.flatten(x, 1)), 0.2))

    net = Net().eval()
    layers = trace(net, (2, 3))
    assert [type(layer.op).__name__ for layer in layers] == ["FlattenOp", "LinearOp", "Activation", "LinearOp"]
    assert layers[2].op.slope == 0.2


def test_unsupported_networks_are_named():
    pool = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)).eval()
    with pytest.raises(SafetylabError, match=r"layer '2' \(MaxPool2d\) is not supported; supported: Linear"):
        trace(pool, (1, 6, 6))
    with pytest.raises(SafetylabError, match=r"training mode \(model, model.0\): call model.eval\(\)"):
        trace(nn.Sequential(nn.Linear(2, 2)), (2,))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return x + torch.relu(self.a(x))

    with pytest.raises(SafetylabError, match="not a chain at 'add'"):
        trace(Residual().eval(), (3,))
    with pytest.raises(SafetylabError, match="only Flatten"):
        trace(nn.Sequential(nn.Flatten(0)).eval(), (3,))


@pytest.mark.parametrize("inner", [nn.Dropout(0.5), nn.BatchNorm1d(4)])
def test_a_submodule_left_in_training_mode_is_refused(inner):
    """The top module is in eval mode, one layer inside is not: its outputs are not the function the bounds
    describe (Dropout drops, BatchNorm uses the batch's statistics), so the model is refused by name."""
    model = nn.Sequential(nn.Linear(3, 4), inner, nn.ReLU(), nn.Linear(4, 2)).eval()
    model[1].train()
    region = linf_ball(torch.rand(2, 3), 0.1)
    with pytest.raises(SafetylabError, match=r"model is in training mode \(model.1\): call model.eval\(\) before "
                                             "verifying it"):
        trace(model, (3,))
    for method in ("ibp", "crown", "alpha-crown"):
        with pytest.raises(SafetylabError, match=r"training mode \(model.1\)"):
            compute_bounds(model, region, method=method)


def test_regions_and_specs_refuse_bad_input():
    x = torch.rand(2, 3)
    with pytest.raises(SafetylabError, match="eps must be >= 0"):
        linf_ball(x, -0.1)
    with pytest.raises(SafetylabError, match="input domain"):
        l2_ball(x + 2, 0.1)
    with pytest.raises(SafetylabError, match="lower must be <= upper"):
        box(x, x - 1)
    with pytest.raises(SafetylabError, match=r"spec must have shape \(batch=2, rows, outputs=4\)"):
        check_spec(torch.ones(2, 3, 5), 2, 4, x)
    with pytest.raises(SafetylabError, match=r"labels must hold class indices in \[0, 3\]"):
        margin_spec(torch.tensor([0, 4]), 4)
    spec = margin_spec(torch.tensor([2, 0]), 3)
    assert torch.equal(spec[0], torch.tensor([[-1.0, 0, 1], [0, -1, 1]]))  # e_2 − e_0, e_2 − e_1
    assert torch.equal(spec[1], torch.tensor([[1.0, -1, 0], [1, 0, -1]]))  # e_0 − e_1, e_0 − e_2
    with pytest.raises(SafetylabError, match="method must be one of ibp, crown, alpha-crown"):
        compute_bounds(mlp(0, (3, 4, 2)), linf_ball(x, 0.1), method="milp")


def test_relaxation_lines_bound_the_activation():
    lower, upper = torch.tensor([-2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 3.0, 2.0, -0.5])
    for slope in (0.0, 0.1):
        below, chord, intercept = relaxation(lower, upper, slope)
        z = lower + torch.linspace(0, 1, 101).unsqueeze(1) * (upper - lower)
        sigma = torch.maximum(z, slope * z)
        assert (below * z <= sigma + 1e-6).all() and (sigma <= chord * z + intercept + 1e-6).all()
        assert torch.allclose(chord * upper + intercept, torch.maximum(upper, slope * upper))  # the chord's ends
        assert below.tolist()[:2] == pytest.approx([slope, 1.0])  # u < −l → slope s; u ≥ −l → 1


def test_leaky_relu_relaxation_keeps_the_bounds_dtype():
    """In float64 the slope of a stable negative neuron is the float64 0.1, not 0.1 rounded to float32."""
    lower = torch.tensor([-2.0, -3.0, 0.5, -1.0], dtype=torch.float64)
    upper = torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    below, chord, intercept = relaxation(lower, upper, 0.1)
    assert below.dtype == chord.dtype == intercept.dtype == torch.float64
    assert below.tolist() == [0.1, 0.1, 1.0, 1.0] and chord[:1].tolist() == [0.1]  # u < −l: the slope s
    alpha = torch.full((4,), 0.5, dtype=torch.float64)
    assert relaxation(lower, upper, 0.1, alpha)[0].tolist() == [0.1, 0.5, 1.0, 0.5]


def issue_network() -> nn.Sequential:
    """``f(x) = −σ(x − 2) − 0.1 − 1e-10`` with ``σ`` = LeakyReLU(0.1), float64: on [0, 1] the neuron is
    inactive, ``f(x) = 0.1 − 0.1 x − 1e-10``, and ``f(1) = −1e-10``: "f > 0" is false there."""
    net = nn.Sequential(nn.Linear(1, 1), nn.LeakyReLU(0.1), nn.Linear(1, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(-2.0)
        net[2].weight.fill_(-1.0)
        net[2].bias.fill_(-0.1 - 1e-10)
    return net.requires_grad_(False)


def test_float64_leaky_relu_property_that_fails_at_a_corner_is_not_verified():
    net, region = issue_network(), box(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    value = net(region.upper).item()
    assert value < 0
    for method in ("ibp", "crown", "alpha-crown"):
        b = compute_bounds(net, region, method=method)
        assert b.lower.dtype == torch.float64
        assert b.lower.item() <= value + 1e-15 and not b.verified().item(), method  # up to float64 rounding


def leaky_net64(seed: int, widths: tuple[int, ...], slope: float) -> nn.Sequential:
    """A LeakyReLU MLP with float64 weights that float32 cannot hold."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        linear = nn.Linear(a, b).double()
        with torch.no_grad():
            linear.weight.copy_(torch.randn(b, a, generator=generator, dtype=torch.float64) / a ** 0.5)
            linear.bias.copy_(0.5 * torch.randn(b, generator=generator, dtype=torch.float64))
        layers += [linear, nn.LeakyReLU(slope)]
    return nn.Sequential(*layers[:-1]).eval().requires_grad_(False)


@pytest.mark.parametrize("seed", range(6))
def test_float64_leaky_relu_bounds_hold_at_every_sampled_point(seed):
    """10,000 points per region (a quarter of them corners) on random float64 LeakyReLU networks: every
    output lies within every method's bounds, up to float64 rounding (1e-12). Small regions leave every
    neuron stable, where CROWN is exact and a slope off by 1.5e-9 shows at the corners."""
    slope = (0.1, 0.01, 0.3)[seed % 3]
    model = leaky_net64(seed, (3, 6, 5, 4), slope)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, generator=generator, dtype=torch.float64)
    spec = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    regions = [linf_ball(x, 1e-3), linf_ball(x, 0.2), l2_ball(x, 0.3), box(x - 0.05, x + 0.1)]
    for region in regions:
        values = spec_values(model, spec, samples(region, 10_000, generator))
        low, high = values.min(1).values, values.max(1).values
        for method in ("ibp", "crown", "alpha-crown"):
            b = compute_bounds(model, region, spec, method, **({"iterations": 5} if method == "alpha-crown" else {}))
            assert b.lower.dtype == torch.float64
            assert (b.lower <= low + 1e-12).all() and (b.upper >= high - 1e-12).all(), (method, region.input_shape)


# ----------------------------------------------------------------------------- soundness


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(2, 9), min_size=3, max_size=5),
       eps=st.floats(0.0, 0.5), kind=st.sampled_from(["linf", "l2", "box"]), slope=st.sampled_from([0.0, 0.05, 0.3]))
def test_every_method_bounds_every_sampled_input(seed, widths, eps, kind, slope):
    model = mlp(seed, tuple(widths), slope)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(3, widths[0], generator=generator)
    if kind == "box":
        region = box(x - eps * torch.rand(x.shape, generator=generator), x + eps)
    else:
        region = (linf_ball if kind == "linf" else l2_ball)(x, eps)
    spec = torch.randn(3, 4, widths[-1], generator=generator)
    values = spec_values(model, spec, samples(region, 400, generator))
    low, high = values.min(1).values, values.max(1).values
    layers = trace(model, (widths[0],))
    with torch.no_grad():
        found = {"ibp": ibp(layers, region, spec), "crown": crown(layers, region, spec),
                 "crown-ibp": crown(layers, region, spec, intermediate="ibp")}
    found["alpha-crown"] = alpha_crown(layers, region, spec, iterations=5)
    for name, b in found.items():
        assert (b.lower <= low + 1e-4).all() and (b.upper >= high - 1e-4).all(), name
    assert (found["alpha-crown"].lower >= found["crown"].lower - 1e-5).all()
    assert (found["alpha-crown"].upper <= found["crown"].upper + 1e-5).all()
    for (cl, cu), (il, iu) in zip(found["crown"].pre_activation, found["ibp"].pre_activation):
        assert (cl >= il - 1e-6).all() and (cu <= iu + 1e-6).all()  # CROWN's intervals inside IBP's


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.3), slope=st.sampled_from([0.0, 0.2]))
def test_conv_bounds_are_sound(seed, eps, slope):
    model = conv_net(seed, slope=slope)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, 8, 8, generator=generator)
    region = linf_ball(x, eps)
    spec = margin_spec(model(x).argmax(1), 5)
    values = spec_values(model, spec, samples(region, 300, generator))
    for method in ("ibp", "crown", "alpha-crown"):
        b = compute_bounds(model, region, spec, method, **({"iterations": 5} if method == "alpha-crown" else {}))
        assert (b.lower <= values.min(1).values + 1e-4).all() and (b.upper >= values.max(1).values - 1e-4).all()


def test_crown_is_exact_where_no_neuron_is_unstable():
    model = mlp(3, (5, 6, 6, 3))
    x = torch.rand(4, 5)
    region = linf_ball(x, 1e-4)  # too small a ball for any neuron to change its sign
    layers = trace(model, (5,))
    with torch.no_grad():
        pre, _ = activation_bounds(layers, region, "ibp")
        assert all(((lo >= 0) | (hi <= 0)).all() for lo, hi in pre)
        c, i = crown(layers, region), ibp(layers, region)
        # the network is affine on the region: CROWN's bounds are the exact extremes, IBP's no tighter
        jac = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0))[0], x[0])
        exact_low = model(x[:1])[0] - jac.abs() @ (region.upper[0] - region.lower[0]) / 2
    assert torch.allclose(c.lower[0], exact_low, atol=1e-5)
    assert (c.lower >= i.lower - 1e-5).all() and (c.upper <= i.upper + 1e-5).all()


def test_bounds_tighten_in_the_expected_order_on_a_trained_digits_classifier(digits, digits_model):
    x, y = digits.x_test[:32], digits.y_test[:32]
    region, spec = linf_ball(x, 0.02), margin_spec(y, digits.num_classes)
    found = {m: compute_bounds(digits_model, region, spec, m) for m in ("ibp", "crown", "alpha-crown")}
    gaps = {m: (b.upper - b.lower).mean().item() for m, b in found.items()}
    assert gaps["alpha-crown"] <= gaps["crown"] < gaps["ibp"]  # CROWN far tighter than IBP on a normal network
    verified = {m: b.verified().float().mean().item() for m, b in found.items()}
    assert verified["ibp"] <= verified["crown"] <= verified["alpha-crown"]
    assert verified["crown"] > 0.5  # at eps 0.02 (5 grey levels of 256) most test digits are certified
