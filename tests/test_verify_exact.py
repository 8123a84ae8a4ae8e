"""Exact verification: the MILP encoding admits exactly the activation's graph, the exact minimum lies inside
every bound and is attained, verdicts agree with hand-worked networks and sampled inputs, counterexamples
are real, time limits give "unknown", and a wrong solver answer never becomes a wrong verdict."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify_bounds import issue_network
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.bounds import alpha_crown, crown, ibp
from safetylab.verify.exact import activation_constraints, dense_layers, minimize_output, verify_exact
from safetylab.verify.network import trace
from safetylab.verify.regions import box, l2_ball, linf_ball, margin_spec


def linear(a, b, gen):
    """A Linear layer with weights drawn from ``gen`` (skip_init: the global generator is left alone)."""
    layer = nn.utils.skip_init(nn.Linear, a, b)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(b, a, generator=gen) / math.sqrt(a))
        layer.bias.copy_(0.3 * torch.randn(b, generator=gen))
    return layer


def mlp(widths, slope=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [linear(a, b, gen), nn.LeakyReLU(slope) if slope else nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval().requires_grad_(False)


def conv_net(seed=0):
    """1×4×4 inputs: a 3×3 convolution to 2 channels (32 ReLUs), then 8 ReLUs and 3 outputs."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.utils.skip_init(nn.Conv2d, 1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(2, 1, 3, 3, generator=gen) / 3)
        conv.bias.copy_(0.1 * torch.randn(2, generator=gen))
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear(32, 8, gen), nn.ReLU(), linear(8, 3, gen))
    return net.eval().requires_grad_(False)


def abs_net(offset, slope=0.0):
    """One input, outputs ``(σ(x) + σ(−x), offset)`` with ``σ(z) = max(z, s z)``: the margin of class 0 is
    ``(1 − s) |x| − offset``."""
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    net = nn.Sequential(nn.Linear(1, 2), act, nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, offset]))
    return net.requires_grad_(False)


def samples(region, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lower, upper = region.lower[0], region.upper[0]
    return lower + torch.rand(n, *lower.shape, generator=gen) * (upper - lower)


def in_box(x, region, tol=1e-6):
    return bool(((x >= region.lower[0] - tol) & (x <= region.upper[0] + tol)).all())


# ----------------------------------------------------------------------------- the encoding
@pytest.mark.parametrize("slope", [0.0, 0.1, 0.3])
def test_activation_constraints_admit_exactly_the_graph_of_the_activation(slope):
    """For each z on a grid and each δ, the rows leave h an interval; over both δ the only h left is σ(z)."""
    lower, upper = np.array([-2.0, 0.5, -3.0]), np.array([3.0, 2.0, -1.0])  # unstable, active, inactive
    neuron, a_z, a_h, a_delta, lo, hi = activation_constraints(lower, upper, slope)
    assert (a_h == 1).all()
    for i in range(3):
        rows = neuron == i
        assert (a_delta[rows] != 0).any() == (i == 0)  # only the unstable neuron has a binary
        for z in np.linspace(lower[i], upper[i], 41):
            feasible = []
            for delta in (0.0, 1.0):
                rest = a_z[rows] * z + a_delta[rows] * delta
                h_lo, h_hi = (lo[rows] - rest).max(), (hi[rows] - rest).min()
                if h_lo <= h_hi + 1e-12:
                    feasible.append((h_lo, h_hi))
            assert feasible, z
            for h_lo, h_hi in feasible:
                assert h_lo == pytest.approx(max(z, slope * z), abs=1e-12)
                assert h_hi == pytest.approx(max(z, slope * z), abs=1e-12)


def test_relu_rows_are_the_big_m_constraints_of_tjeng_et_al():
    """l = −1, u = 2: h − z >= 0, h >= 0, h − z + δ <= 1 (h <= z − l(1 − δ)), h − 2δ <= 0 (h <= u δ)."""
    neuron, a_z, a_h, a_delta, lo, hi = activation_constraints(np.array([-1.0]), np.array([2.0]), 0.0)
    assert neuron.tolist() == [0, 0, 0, 0]
    assert np.allclose(a_z, [-1, 0, -1, 0]) and np.allclose(a_delta, [0, 0, 1, -2])
    assert np.allclose(lo[:2], 0) and np.isinf(hi[:2]).all()
    assert np.isinf(lo[2:]).all() and np.allclose(hi[2:], [1, 0])


@pytest.mark.parametrize("net, shape", [(mlp([4, 8, 8, 3], 0.1), (4,)), (conv_net(), (1, 4, 4))])
def test_dense_layers_reproduce_the_network(net, shape):
    maps, slopes = dense_layers(trace(net, shape))
    assert len(maps) == len(slopes) + 1 == 3
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    h = x.flatten(1)
    for k, (weight, bias) in enumerate(maps):
        h = h @ weight.T + bias
        if k < len(slopes):
            h = torch.maximum(h, slopes[k] * h)
    assert torch.allclose(h, net(x), atol=1e-5)


# ----------------------------------------------------------------------------- networks with known answers
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_hand_network_verdicts_and_minima(slope):
    """Margin (1 − s)|x| ∓ 0.5(1 − s) over x ∈ [−1, 2]: the minimum is at x = 0. CROWN cannot verify the
    positive case (its lower line for σ(x) is x, for σ(−x) it is s·(−x), so it bounds the margin by
    (1 − s)·(−1) + 0.5(1 − s) < 0); the MILP decides both."""
    region, spec, half = box(torch.tensor([[-1.0]]), torch.tensor([[2.0]])), margin_spec(torch.tensor([0]), 2), 0.5
    offset = half * (1 - slope)
    positive = abs_net(-offset, slope)
    assert crown(trace(positive, (1,)), region, spec).lower.item() == pytest.approx(-offset, abs=1e-6)
    (verified,) = verify_exact(positive, region, spec, attack=False)
    assert verified.status == "verified" and verified.method == "milp" and verified.counterexample is None
    assert verified.optimal == [True] and verified.minimum[0] == pytest.approx(offset, abs=1e-6)

    (falsified,) = verify_exact(abs_net(offset, slope), region, spec, attack=False)
    assert falsified.status == "falsified" and falsified.row == 0
    assert falsified.minimum[0] == pytest.approx(-offset, abs=1e-6)
    assert abs(falsified.counterexample.item()) <= half + 1e-6  # where (1 − s)|x| <= offset
    assert falsified.counterexample.dtype == torch.float32
    (in_float64,) = verify_exact(abs_net(offset, slope).double(), box(region.lower.double(), region.upper.double()),
                                 spec, attack=False)
    assert in_float64.status == "falsified" and in_float64.counterexample.dtype == torch.float64

    (by_bounds,) = verify_exact(positive, box(torch.tensor([[0.6]]), torch.tensor([[2.0]])), spec)
    assert by_bounds.status == "verified" and by_bounds.method == "crown"  # stable neurons: CROWN is exact
    assert by_bounds.minimum[0] == pytest.approx(0.6 * (1 - slope) + offset, abs=1e-6)


def test_linear_network_minimum_is_at_a_corner():
    net = mlp([3, 2])
    w, b = net[0].weight.detach().double(), net[0].bias.detach().double()
    region = box(torch.full((1, 3), -1.0), torch.full((1, 3), 2.0))
    found = minimize_output(trace(net, (3,)), region, torch.tensor([1.0, 0.0]))
    corner = torch.where(w[0] > 0, -1.0, 2.0).double()
    assert found.optimal and found.value == pytest.approx(float(w[0] @ corner + b[0]), abs=1e-6)
    assert torch.allclose(found.x, corner)


@pytest.mark.parametrize("attack", [True, False])
def test_float64_leaky_relu_property_false_by_1e_10_is_falsified(attack):
    """``f(x) = 0.1 − 0.1 x − 1e-10`` on [0, 1] (LeakyReLU(0.1) inactive, float64): f(1) = −1e-10, so
    "f > 0" is false, found by the attack or by the program, and the counterexample really violates it."""
    net = issue_network()
    region = box(torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    (result,) = verify_exact(net, region, torch.ones(1, 1), attack=attack)
    assert result.status == "falsified" and result.method == ("attack" if attack else "milp")
    x = result.counterexample
    assert x.dtype == torch.float64 and in_box(x, region, 0.0)
    assert net(x.unsqueeze(0)).item() <= 0
    assert result.minimum[0] <= 0


# ----------------------------------------------------------------------------- the exact minimum
def check_minimum(net, shape, region, c, n_samples=2000):
    """The exact minimum of c·f lies inside every bound method's interval, is attained by its input and
    is below the value at sampled inputs of the region; returns it."""
    layers = trace(net, shape)
    found = minimize_output(layers, region, c)
    assert found.optimal and found.value <= found.bound + 1e-6 * (1 + abs(found.value))
    assert in_box(found.x, region)
    attained = float(net(found.x.float().unsqueeze(0))[0] @ c)
    assert attained == pytest.approx(found.value, abs=1e-4)
    with torch.no_grad():
        for method in (ibp, crown, alpha_crown):
            bounds = method(layers, region, c[None])
            assert bounds.lower.item() - 1e-4 <= found.value <= bounds.upper.item() + 1e-4, bounds.method
        sampled = net(samples(region, n_samples)) @ c
    assert sampled.min().item() >= found.value - 1e-4
    return found.value


@pytest.mark.parametrize("net, shape, eps", [(mlp([4, 8, 8, 3], seed=3), (4,), 0.3),
                                             (conv_net(1), (1, 4, 4), 0.15)])
def test_exact_minimum_and_maximum_between_bounds_and_samples(net, shape, eps):
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(2))
    region = linf_ball(x, eps)
    c = torch.tensor([1.0, -1.0, 0.0])
    lowest, highest = check_minimum(net, shape, region, c), -check_minimum(net, shape, region, -c)
    assert lowest < highest
    layers = trace(net, shape)
    with torch.no_grad():
        bounds = crown(layers, region, c[None])
    assert bounds.lower.item() < lowest - 1e-3 or bounds.upper.item() > highest + 1e-3  # bounds are loose here


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(2, 6), min_size=1, max_size=2),
       slope=st.sampled_from([0.0, 0.2]), eps=st.floats(0.05, 0.6))
def test_property_exact_minimum_and_verdict(seed, widths, slope, eps):
    net = mlp([3, *widths, 2], slope, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(1, 3, generator=gen)
    region = linf_ball(x, eps)
    minimum = check_minimum(net, (3,), region, torch.randn(2, generator=gen), n_samples=500)
    assert math.isfinite(minimum)
    # the verdict on the margin of the class at x is the sign of its exact minimum
    label = net(x).argmax(1)
    spec = margin_spec(label, 2)
    truth = minimize_output(trace(net, (3,)), region, spec[0, 0]).value
    (result,) = verify_exact(net, region, spec)
    if truth > 1e-5:
        assert result.status == "verified"
    elif truth < -1e-5:
        assert result.status == "falsified"
        assert in_box(result.counterexample, region, 0.0)
        assert float(net(result.counterexample.unsqueeze(0))[0] @ spec[0, 0]) <= 0


# ----------------------------------------------------------------------------- verify_exact
def test_verdicts_agree_with_counterexamples_samples_and_bound_methods():
    net = mlp([4, 8, 8, 3], seed=0)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(6))
    labels = net(x).argmax(1)
    labels[0] = (labels[0] + 1) % 3  # the centre itself violates this one
    region, spec = linf_ball(x, 0.4), margin_spec(labels, 3)
    results = verify_exact(net, region, spec, attack=False)
    assert len(results) == 6
    assert results[0].status == "falsified"
    # at this radius CROWN verifies some examples, the MILP verifies one it cannot, and falsifies another
    assert {(r.status, r.method) for r in results[1:]} == {("verified", "crown"), ("verified", "milp"),
                                                           ("falsified", "milp")}
    with torch.no_grad():
        screened = crown(trace(net, (4,)), region, spec).lower
    for i, r in enumerate(results):
        one = box(region.lower[i:i + 1], region.upper[i:i + 1])
        margins = net(samples(one, 1000, seed=i)) @ spec[i].T  # (n, S)
        if r.status == "falsified":
            assert in_box(r.counterexample, one, 0.0)  # inside the region exactly, after clipping
            assert float(net(r.counterexample.unsqueeze(0))[0] @ spec[i, r.row]) <= 0
        else:
            assert r.status == "verified" and (margins > 0).all()
            assert r.method == ("crown" if (screened[i] > 0).all() else "milp")
        for row, (value, optimal) in enumerate(zip(r.minimum, r.optimal)):
            assert value <= margins[:, row].min().item() + 1e-4  # a lower bound, or the minimum
            if optimal:
                assert value >= screened[i, row].item() - 1e-4
    # the verdict is exact whatever bounds give the activation intervals; the layers give the same answer
    layers = trace(net, (4,))
    for other in (verify_exact(net, region, spec, bounds="ibp"), verify_exact(layers, region, spec)):
        assert [r.status for r in other] == [r.status for r in results]
    # the attack that runs first by default falsifies the centre's violation without a program
    attacked = verify_exact(net, region, spec)
    assert attacked[0].status == "falsified" and attacked[0].method == "attack"
    assert float(net(attacked[0].counterexample.unsqueeze(0))[0] @ spec[0, attacked[0].row]) <= 0
    assert [r.status for r in attacked] == [r.status for r in results]


def test_tiny_conv_net():
    net = conv_net(2)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    region, spec = linf_ball(x, 0.15), margin_spec(net(x).argmax(1), 3)
    results = verify_exact(net, region, spec, time_limit=20.0, attack=False)
    assert [(r.status, r.method) for r in results] == [("verified", "milp"), ("falsified", "milp")]
    for i, r in enumerate(results):
        if r.status == "falsified":
            assert float(net(r.counterexample.unsqueeze(0))[0] @ spec[i, r.row]) <= 0
        else:
            one = box(region.lower[i:i + 1], region.upper[i:i + 1])
            assert (net(samples(one, 1000)) @ spec[i].T > 0).all()


def test_time_limit_gives_unknown_never_a_verdict():
    net = abs_net(-0.5)  # verified, but only by the MILP
    region, spec = box(torch.tensor([[-1.0]]), torch.tensor([[2.0]])), margin_spec(torch.tensor([0]), 2)
    (result,) = verify_exact(net, region, spec, time_limit=1e-6)
    assert result.status == "unknown" and result.counterexample is None and "time limit" in result.note
    assert result.minimum[0] <= 0.5  # only a lower bound is known
    found = minimize_output(trace(conv_net(), (1, 4, 4)), linf_ball(torch.full((1, 1, 4, 4), 0.5), 0.5),
                            torch.tensor([1.0, -1.0, 0.0]), time_limit=1e-6)
    assert not found.optimal and found.x is None and found.bound == -math.inf


@pytest.mark.parametrize("point, why", [(1.5, "not <= 0"), (3.0, "outside the region")])
def test_a_solver_answer_the_network_does_not_confirm_gives_unknown(monkeypatch, point, why):
    """A solver that claims value −0.5 at an input where the real margin is positive (or that lies outside
    the region) must not produce a falsified verdict."""
    import safetylab.verify.exact as exact

    real = exact.milp

    def wrong(*args, **kwargs):
        result = real(*args, **kwargs)
        result.x[0], result.fun, result.mip_dual_bound = point, -1.0, -1.0  # the objective adds 0.5: −0.5
        return result

    monkeypatch.setattr(exact, "milp", wrong)
    region, spec = box(torch.tensor([[-1.0]]), torch.tensor([[2.0]])), margin_spec(torch.tensor([0]), 2)
    (result,) = verify_exact(abs_net(-0.5), region, spec)
    assert result.status == "unknown" and result.counterexample is None and why in result.note


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    net, x = mlp([4, 8, 3]), torch.rand(2, 4)
    region, spec = linf_ball(x, 0.1), margin_spec(torch.tensor([0, 1]), 3)
    with pytest.raises(SafetylabError, match="boxes and L∞ balls"):
        verify_exact(net, l2_ball(x, 0.1), spec)
    with pytest.raises(SafetylabError, match="training mode"):
        verify_exact(mlp([4, 8, 3]).train(), region, spec)
    partly = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).eval()
    partly[1].train()  # the top module in eval mode, one layer not: its outputs are random
    with pytest.raises(SafetylabError, match=r"training mode \(model.1\): call model.eval\(\) before verifying it"):
        verify_exact(partly, region, spec)
    with pytest.raises(SafetylabError, match="spec must have shape"):
        verify_exact(net, region, torch.ones(3, 2, 4))
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(SafetylabError, match="time_limit"):
            verify_exact(net, region, spec, time_limit=bad)
    with pytest.raises(SafetylabError, match="bounds must be one of"):
        verify_exact(net, region, spec, bounds="lp")
    with pytest.raises(SafetylabError, match=r"region holds inputs of shape \(5,\) but the network takes \(4,\)"):
        verify_exact(trace(net, (4,)), linf_ball(torch.rand(2, 5), 0.1), spec)
    layers = trace(net, (4,))
    with pytest.raises(SafetylabError, match="one example"):
        minimize_output(layers, region, torch.ones(3))
    with pytest.raises(SafetylabError, match=r"shape \(3,\)"):
        minimize_output(layers, linf_ball(x[:1], 0.1), torch.ones(2))
    with pytest.raises(SafetylabError, match="list of Layer"):
        minimize_output([], linf_ball(x[:1], 0.1), torch.ones(3))


# ----------------------------------------------------------------------------- nothing on stdout
def flushed_output(capfd) -> tuple[str, str]:
    """What reached file descriptors 1 and 2, C's buffered stdout included (libc holds a line written by
    ``printf`` until it flushes, at exit when stdout is not a terminal)."""
    ctypes.CDLL(None).fflush(None)
    return capfd.readouterr()


def test_the_solver_writes_nothing_to_stdout_from_c(monkeypatch, capfd):
    """HiGHS prints a developer line with C's ``printf`` when it repairs a solution, whatever its options
    say; a solver doing the same on every call must leave stdout and stderr empty."""
    import safetylab.verify.exact as exact

    real = exact.milp

    def chatty(*args, **kwargs):
        ctypes.CDLL(None).printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(exact, "milp", chatty)
    print("before", flush=True)  # what the caller wrote before is kept, in order
    region, spec = box(torch.tensor([[-1.0]]), torch.tensor([[2.0]])), margin_spec(torch.tensor([0]), 2)
    (result,) = verify_exact(abs_net(-0.5), region, spec, attack=False)
    print("after", flush=True)
    assert result.status == "verified" and result.method == "milp"
    assert flushed_output(capfd) == ("before\nafter\n", "")


def test_verify_exact_writes_nothing_to_stdout(capfd):
    """On this network HiGHS repairs a solution (and printed its line) on every run."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
        x = torch.rand(4, 64)[2:3]
    results = verify_exact(net, linf_ball(x, 0.03), margin_spec(net(x).argmax(1), 8), attack=False)
    assert results[0].status == "falsified" and results[0].method == "milp"
    assert flushed_output(capfd) == ("", "")
