"""Bounds and exact verification: safetylab.verify against bound-propagation and Marabou, in one run.

**Bounds.** A 64-256-256-10 ReLU MLP trained briefly on scikit-learn's digits (all ten classes), L∞ balls
of radius ``--eps`` around 64 test digits, the specification the ten classes' margins (9 rows per digit).
Each side computes the margins' lower and upper bounds by IBP, CROWN and α-CROWN:

- *safetylab*: :func:`safetylab.verify.bounds.ibp`, ``crown``, ``alpha_crown`` on the traced network;
- *bound-propagation* 0.4.7 (PyPI, benchmark-only): ``BoundModelFactory().build(model)``; it has no
  specification matrix, so its final backward pass starts from ``C`` (``initial_linear_bounds``) and its
  IBP folds ``C`` into the last layer, as ours does; its CROWN runs with ``adaptive_relu=True``, the lower
  slope of CROWN's paper (its default, the slope ``u / (u − l)``, is looser: ours would win for nothing).
  Its α-CROWN: 20 Adam steps (lr 0.01), one α per neuron shared by every row, the last iterate kept.

Times are medians over ``--rounds`` calls after a warm-up call, also given in forward-pass equivalents
(÷ the median time of one forward pass of the 64 digits). Where the methods are the same (IBP, CROWN)
the bounds must agree to 1e-5 relative to 1 + |bound| (float32 rounding on margins near 20), and to 1e-9
in float64; α-CROWN's differ by design (ours: one α per row and neuron, the best iterate kept, CROWN's
slopes to start), so the table gives each side's mean lower bound and share verified, and ours at 5, 10
and 20 iterations.

**Exact.** A 64-32-32-10 MLP (64 ReLUs) on the same digits; for ``--exact-digits`` test digits at each ε,
our MILP (:func:`safetylab.verify.exact.verify_exact`, HiGHS) and Marabou 2.0.0 (``maraboupy``, the network
written from its weights, the negated property one disjunction) decide robustness with ``--time-limit``
seconds per digit; the verdicts must never contradict, and counterexamples are checked on the network.

    python benchmarks/verify_vs_peers.py [--rounds 5] [--eps 0.02]

Needs bound-propagation and maraboupy next to safetylab (see ``benchmarks/requirements-verify.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from safetylab.verify.bounds import alpha_crown, crown, ibp
from safetylab.verify.exact import verify_exact
from safetylab.verify.network import trace
from safetylab.verify.regions import linf_ball, margin_spec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # maraboupy warns at import that its TF and ONNX readers are missing
    from maraboupy import Marabou, MarabouCore, MarabouUtils
    from maraboupy.MarabouNetwork import MarabouNetwork
from bound_propagation import BoundModelFactory, BoundSequential, HyperRectangle, LinearBounds


# ----------------------------------------------------------------------------- data and networks
def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def mlp(widths: tuple[int, ...], x: torch.Tensor, y: torch.Tensor, steps: int = 600, seed: int = 0) -> nn.Sequential:
    """A ReLU MLP trained by Adam on (x, y), in eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(x), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ----------------------------------------------------------------------------- the peer's bounds
class SpecBoundSequential(BoundSequential):
    """bound-propagation's network whose final backward pass starts from ``C`` (B, S, K), not the identity."""

    spec: torch.Tensor | None = None

    def initial_linear_bounds(self, region, out_size, lower=True, upper=True):
        if self.spec is None:
            return super().initial_linear_bounds(region, out_size, lower, upper)
        bias = self.spec.new_zeros(self.spec.shape[:-1])
        return LinearBounds(region, (self.spec, bias) if lower else None, (self.spec, bias) if upper else None)


def peer_bounds(model: nn.Sequential, lower: torch.Tensor, upper: torch.Tensor, spec: torch.Tensor, method: str,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """bound-propagation's bounds of ``C f`` (built anew per call, as a user would per batch)."""
    factory = BoundModelFactory(adaptive_relu=True)
    bounded = SpecBoundSequential(model, factory, **factory.kwargs)
    region = HyperRectangle(lower, upper)
    with torch.no_grad():
        if method == "ibp":
            interval = region.bounding_hyperrect()
            for layer in bounded.bound_sequential[:-1]:
                interval = layer.ibp_forward(interval)
            last = model[-1]
            weight, bias = spec @ last.weight, spec @ last.bias
            mid = (weight @ interval.center.unsqueeze(-1)).squeeze(-1) + bias
            rad = (weight.abs() @ (interval.width / 2).unsqueeze(-1)).squeeze(-1)
            return mid - rad, mid + rad
        bounded.spec = spec
        found = bounded.crown(region, alpha=method == "alpha-crown").concretize()
        return found.lower, found.upper


def ours(layers, region, spec, method: str, iterations: int = 20):
    if method == "alpha-crown":
        found = alpha_crown(layers, region, spec, iterations=iterations)
    else:
        with torch.no_grad():
            found = (ibp if method == "ibp" else crown)(layers, region, spec)
    return found.lower, found.upper


# ----------------------------------------------------------------------------- Marabou
@contextlib.contextmanager
def quiet_stdout():
    """Marabou's solver prints from C++; send file descriptor 1 to /dev/null and always restore it."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def marabou_verify(model: nn.Sequential, lower: np.ndarray, upper: np.ndarray, label: int, time_limit: float):
    """Marabou on one box: "verified" (the negated property is unsat), "falsified" with its input, or
    "unknown" at the time limit (whole seconds)."""
    net = MarabouNetwork()
    current = [net.getNewVariable() for _ in range(lower.size)]
    for v, lo, hi in zip(current, lower, upper):
        net.setLowerBound(v, float(lo))
        net.setUpperBound(v, float(hi))
    inputs = list(current)
    for layer in model:
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
            out = [net.getNewVariable() for _ in range(len(bias))]
            for r, v in enumerate(out):
                net.addEquality(current + [v], list(weight[r]) + [-1.0], float(-bias[r]))
        else:
            out = [net.getNewVariable() for _ in current]
            for a, o in zip(current, out):
                net.addRelu(a, o)
        current = out
    net.inputVars, net.outputVars = [np.array(inputs).reshape(1, -1)], [np.array(current).reshape(1, -1)]
    disjuncts = []
    for j in range(len(current)):
        if j != label:  # f_y − f_j <= 0
            equation = MarabouUtils.Equation(MarabouCore.Equation.LE)
            equation.addAddend(1.0, current[label])
            equation.addAddend(-1.0, current[j])
            equation.setScalar(0.0)
            disjuncts.append([equation])
    net.addDisjunctionConstraint(disjuncts)
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=max(1, math.ceil(time_limit)))
    with quiet_stdout():
        status, values, _ = net.solve(verbose=False, options=options)
    if status == "unsat":
        return "verified", None
    if status == "sat":
        return "falsified", torch.tensor([values[v] for v in inputs], dtype=torch.float64)
    return "unknown", None


# ----------------------------------------------------------------------------- the run
def timed(fn, rounds: int) -> tuple[float, object]:
    out = fn()  # warm-up (the peer compiles TorchScript kernels on its first call)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bounds_benchmark(args, x_train, y_train, x_test, y_test) -> None:
    model = mlp((64, 256, 256, 10), x_train, y_train)
    x, y = x_test[:64], y_test[:64]
    region, spec = linf_ball(x, args.eps), margin_spec(y, 10)
    layers = trace(model, (64,))
    with torch.no_grad():
        forward, _ = timed(lambda: model(x), 50)
    print(f"bounds: MLP 64-256-256-10 (test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}), "
          f"64 digits, L∞ eps {args.eps:g}, margins (9 rows a digit); one forward pass {forward * 1e3:.3f} ms")
    print(f"{'method':<20} {'side':<18} {'ms':>9} {'fwd passes':>11} {'mean lower':>11} {'verified':>9} "
          f"{'max rel.diff':>12} {'peer/ours':>10}")
    for method in ("ibp", "crown", "alpha-crown"):
        rounds = args.rounds if method != "alpha-crown" else max(1, args.rounds // 2)
        t_peer, (pl, pu) = timed(lambda m=method: peer_bounds(model, region.lower, region.upper, spec, m), rounds)
        variants = [20, 10, 5] if method == "alpha-crown" else [None]
        for iterations in variants:
            t_ours, (ol, ou) = timed(lambda m=method, k=iterations or 20: ours(layers, region, spec, m, k), rounds)
            label = method if iterations is None else f"{method} ({iterations} it.)"
            diff = max(((ol - pl).abs() / (1 + pl.abs())).max().item(), ((ou - pu).abs() / (1 + pu.abs())).max().item())
            print(f"{label:<20} {'safetylab':<18} {t_ours * 1e3:9.1f} {t_ours / forward:11.0f} {ol.mean():11.4f} "
                  f"{(ol > 0).all(1).float().mean():9.3f} {diff:12.2e} {t_peer / t_ours:10.2f}")
        print(f"{method:<20} {'bound-propagation':<18} {t_peer * 1e3:9.1f} {t_peer / forward:11.0f} {pl.mean():11.4f} "
              f"{(pl > 0).all(1).float().mean():9.3f}")
        if method != "alpha-crown":
            assert diff <= 1e-5, f"{method}: the bounds disagree by {diff:.2e}"
    # in float64 the same methods must agree to rounding: the float32 differences are float32's
    model64, region64 = model.double(), linf_ball(x.double(), args.eps)
    layers64 = trace(model64, (64,))
    for method in ("ibp", "crown"):
        ol, ou = ours(layers64, region64, spec.double(), method)
        pl, pu = peer_bounds(model64, region64.lower, region64.upper, spec.double(), method)
        diff = max((ol - pl).abs().max().item(), (ou - pu).abs().max().item())
        print(f"{method} in float64: max |safetylab − bound-propagation| = {diff:.1e}")
        assert diff <= 1e-9, f"{method}: the float64 bounds disagree by {diff:.2e}"
    model.float()


def exact_benchmark(args, x_train, y_train, x_test, y_test) -> None:
    model = mlp((64, 32, 32, 10), x_train, y_train)
    x, y = x_test[:args.exact_digits], y_test[:args.exact_digits]
    print(f"\nexact: MLP 64-32-32-10 (test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}), "
          f"{len(x)} digits per eps, at most {args.time_limit:g} s a digit")
    print(f"{'eps':>6} {'side':<10} {'verified':>9} {'falsified':>10} {'unknown':>8} {'seconds':>9} {'disagree':>9}")
    for eps in args.exact_eps:
        region, spec = linf_ball(x, eps), margin_spec(y, 10)
        start = time.perf_counter()
        mine = [r.status for r in verify_exact(model, region, spec, time_limit=args.time_limit)]
        t_ours = time.perf_counter() - start
        start, theirs = time.perf_counter(), []
        for i in range(len(x)):
            status, cex = marabou_verify(model, region.lower[i].double().numpy(), region.upper[i].double().numpy(),
                                         int(y[i]), args.time_limit)
            if cex is not None:  # Marabou's counterexample, checked on the network
                with torch.no_grad():
                    out = model.double()(cex.unsqueeze(0))[0]
                    model.float()
                assert out[y[i]] - torch.cat([out[:y[i]], out[y[i] + 1:]]).max() <= 1e-6
            theirs.append(status)
        t_peer = time.perf_counter() - start
        clash = sum({a, b} == {"verified", "falsified"} for a, b in zip(mine, theirs))
        for side, verdicts, seconds in (("safetylab", mine, t_ours), ("Marabou", theirs, t_peer)):
            counts = [verdicts.count(s) for s in ("verified", "falsified", "unknown")]
            print(f"{eps:6g} {side:<10} {counts[0]:9d} {counts[1]:10d} {counts[2]:8d} {seconds:9.2f} {clash:9d}")
        assert clash == 0, f"eps {eps}: the verifiers contradict each other on {clash} digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.02)
    parser.add_argument("--exact-digits", type=int, default=32)
    parser.add_argument("--exact-eps", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits()
    print(f"torch {torch.__version__}, 1 thread")
    bounds_benchmark(args, *data)
    exact_benchmark(args, *data)


if __name__ == "__main__":
    main()
