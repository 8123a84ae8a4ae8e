"""Bad input to the verification entry points fails with a SafetylabError that says what was expected —
regions (numpy arrays, integer tensors, shapes and dtypes that disagree), specifications and labels, a
region that does not fit the network — and tensors of different floating dtypes are bounded in the wider
one, never by rounding the region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.bounds import alpha_crown, compute_bounds, crown, ibp
from safetylab.verify.exact import minimize_output, verify_exact
from safetylab.verify.network import trace
from safetylab.verify.regions import Region, box, l2_ball, linf_ball, margin_spec

METHODS = ("ibp", "crown", "alpha-crown")


def mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)).to(dtype).eval().requires_grad_(False)


X = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- regions
@pytest.mark.parametrize("make, match", [
    (lambda: box(X.numpy(), X.numpy() + 1), r"lower must be a floating-point tensor \(batch, \*input_shape\), got "
                                            "ndarray"),
    (lambda: box(X.long(), X.long() + 1), "lower must be a floating-point tensor .* got torch.int64"),
    (lambda: box(X, (X + 1).double()), r"upper must have lower's shape \(2, 4\) and dtype torch.float32 on cpu, "
                                       r"got \(2, 4\) torch.float64 on cpu"),
    (lambda: box(X, X[:, :3] + 1), r"upper must have lower's shape \(2, 4\) .* got \(2, 3\)"),
    (lambda: box(X[0], X[0] + 1), r"\(batch, \*input_shape\) with at least one example, got shape \(4,\)"),
    (lambda: box(X[:0], X[:0]), "at least one example"),
    (lambda: box(X, X + float("inf")), "finite"),
    (lambda: box(X, X - 1), "lower must be <= upper"),
    (lambda: linf_ball(X.numpy(), 0.1), "x must be a floating-point tensor .* got ndarray"),
    (lambda: linf_ball(torch.tensor([[0, 1]]), 0.1), "x must be a floating-point tensor .* got torch.int64"),
    (lambda: l2_ball(X.numpy(), 0.1), "x must be a floating-point tensor"),
    (lambda: l2_ball(X[0], 0.1), r"x must be a floating-point tensor \(batch, \*input_shape\) with at least one "
                                 r"example, got shape \(4,\)"),
    (lambda: Region(X, X + 1, X[:, :2], 0.1), r"center must have lower's shape \(2, 4\)"),
    (lambda: Region(X, X + 1, X), "center and radius"),
    (lambda: Region(X, X + 1, X, -0.1), "radius must be a finite number >= 0"),
])
def test_bad_regions(make, match):
    with pytest.raises(SafetylabError, match=match):
        make()


def test_bad_specs_and_labels():
    net, region = mlp(), linf_ball(X, 0.1)
    for method in METHODS:
        with pytest.raises(SafetylabError, match=r"spec must be a tensor \(batch, rows, outputs\) or "
                                                 r"\(rows, outputs\), got ndarray"):
            compute_bounds(net, region, np.ones((2, 3)), method)
        with pytest.raises(SafetylabError, match=r"spec must have shape \(batch=2, rows, outputs=3\)"):
            compute_bounds(net, region, torch.ones(2, 1, 4), method)
        with pytest.raises(SafetylabError, match="at least one row"):
            compute_bounds(net, region, torch.ones(2, 0, 3), method)  # no row: "verified" would be vacuous
        with pytest.raises(SafetylabError, match="finite"):
            compute_bounds(net, region, torch.tensor([[float("nan"), 1.0, 0.0]]), method)
    with pytest.raises(SafetylabError, match="spec must be a tensor"):
        verify_exact(net, region, np.ones((2, 3)))
    with pytest.raises(SafetylabError, match="at least one row"):
        verify_exact(net, region, torch.ones(0, 3))
    with pytest.raises(SafetylabError, match="labels must be a 1-D integer .* got ndarray"):
        margin_spec(np.array([0, 1]), 3)
    with pytest.raises(SafetylabError, match="labels must be a 1-D integer .* got torch.float32"):
        margin_spec(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(SafetylabError, match="labels must be non-empty"):
        margin_spec(torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(SafetylabError, match="num_classes must be an integer >= 2"):
        margin_spec(torch.tensor([0]), 1)
    # a specification of integers is the same as of floats
    ints = torch.tensor([[1, -1, 0], [0, 2, -1]])
    assert torch.equal(crown(trace(net, (4,)), region, ints).lower, crown(trace(net, (4,)), region, ints.float()).lower)


# ----------------------------------------------------------------------------- a region that fits the network
def test_a_region_that_does_not_fit_the_network():
    net, layers = mlp(), trace(mlp(), (4,))
    wide = linf_ball(torch.rand(2, 5), 0.1)
    for method in METHODS:
        with pytest.raises(SafetylabError, match=r"layer '0' \(Linear\) cannot take inputs of shape \(5,\)"):
            compute_bounds(net, wide, method=method)
        with pytest.raises(SafetylabError, match="region must be a Region"):
            compute_bounds(net, (X, X + 0.1), method=method)
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()).eval()
    with pytest.raises(SafetylabError, match=r"layer '0' \(Conv2d\) cannot take inputs of shape \(1, 5, 5\)"):
        compute_bounds(conv, linf_ball(torch.rand(1, 1, 5, 5), 0.1))
    for bound in (ibp, crown, alpha_crown):
        with pytest.raises(SafetylabError, match=r"region holds inputs of shape \(5,\) but the network takes \(4,\)"):
            bound(layers, wide)
        with pytest.raises(SafetylabError, match="region must be a Region"):
            bound(layers, X)
        with pytest.raises(SafetylabError, match="layers must be a non-empty list of Layer"):
            bound(net, linf_ball(X, 0.1))
    with pytest.raises(SafetylabError, match="model must be an nn.Module"):
        compute_bounds(layers, linf_ball(X, 0.1))
    with pytest.raises(SafetylabError, match=r"cannot take inputs of shape \(5,\)"):
        verify_exact(net, wide, None)
    with pytest.raises(SafetylabError, match="region must be a Region"):
        verify_exact(net, X.numpy(), None)
    with pytest.raises(SafetylabError, match=r"region holds inputs of shape \(5,\) but the network takes \(4,\)"):
        minimize_output(layers, linf_ball(torch.rand(1, 5), 0.1), torch.ones(3))
    with pytest.raises(SafetylabError, match="finite"):
        minimize_output(layers, linf_ball(X[:1], 0.1), torch.tensor([1.0, float("inf"), 0.0]))


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("method", METHODS)
def test_mixed_dtypes_are_bounded_in_the_wider_one(method):
    """A float32 network over a float64 region is bounded in float64 — its weights widened, which is exact —
    as the same network in float64 is; so is a float64 network over a float32 region, and a float64
    specification. Rounding the region to float32 instead could move its edges inward."""
    spec = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    region32 = linf_ball(X, 0.3)
    region64 = box(region32.lower.double(), region32.upper.double())  # the same region
    reference = compute_bounds(mlp(torch.float64), region64, spec, method)  # the same weights
    for net, region, c in ((mlp(), region64, spec), (mlp(torch.float64), region32, spec),
                           (mlp(), region32, spec.double())):
        found = compute_bounds(net, region, c, method)
        assert found.lower.dtype == found.upper.dtype == torch.float64
        assert torch.allclose(found.lower, reference.lower, rtol=0, atol=1e-12)
        assert torch.allclose(found.upper, reference.upper, rtol=0, atol=1e-12)
    assert compute_bounds(mlp(), region32, spec, method).lower.dtype == torch.float32
    # exact verification works in float64 whatever the dtypes, and checks its answer in the network's own
    statuses = [r.status for r in verify_exact(mlp(), region64, spec)]
    assert statuses == [r.status for r in verify_exact(mlp(torch.float64), region32, spec)]


def test_a_network_without_parameters_is_traced_in_float64():
    """Average pooling's constant 1/9 is built in float64 when no parameter fixes the network's dtype:
    the bounds of a float64 region are then exact to rounding."""
    net = nn.Sequential(nn.AvgPool2d(3), nn.Flatten()).eval()
    layers = trace(net, (1, 3, 3))
    assert layers[0].op.weight.dtype == torch.float64 and layers[0].op.weight.flatten()[0].item() == 1 / 9
    lower = torch.rand(1, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    region = box(lower, lower + 0.25)
    for method in METHODS:
        b = compute_bounds(net, region, method=method)
        assert b.lower.item() == pytest.approx(net(lower).item(), rel=0, abs=1e-15)
        assert b.upper.item() == pytest.approx(net(lower + 0.25).item(), rel=0, abs=1e-15)
