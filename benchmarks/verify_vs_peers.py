"""Bounds and exact verification: safetylab.verify against bound-propagation and Marabou, in one run.

**Bounds.** A 64-256-256-10 ReLU MLP trained briefly on scikit-learn's digits (all ten classes), L∞ balls
of radius ``--eps`` around 64 test digits, the specification the ten classes' margins (9 rows per digit).
Each side computes the margins' lower and upper bounds by IBP, CROWN and α-CROWN:

- *safetylab*: :func:`safetylab.verify.bounds.ibp`, ``crown``, ``alpha_crown`` on the traced network;
- *bound-propagation* 0.4.7 (PyPI, benchmark-only), at its best: ``BoundModelFactory(...).build`` on a copy
  of the network with frozen parameters (``requires_grad_(False)``; otherwise its α-CROWN iterations also
  compute the weights' gradients). It has no specification matrix, so its final backward pass starts
  from ``C`` (``initial_linear_bounds``) and its IBP folds ``C`` into the last layer, as ours does; its
  CROWN runs with ``adaptive_relu=True``, the lower slope of CROWN's paper (its default, the slope
  ``u / (u − l)``, is looser: ours would win for nothing). Its α-CROWN: Adam with our learning rate (0.1;
  its default is 0.01, also timed at 20 iterations), one α per neuron shared by every row, the last
  iterate kept; compared with ours at matched iterations (5, 10, 20).

Timing: ``--rounds`` rounds after one warm-up call of each side (the peer compiles TorchScript kernels on
its first call); in each round every side of a comparison runs once, in a rotating order. A speed ratio
is the median over rounds of the peer's time over ours taken moments apart (quartiles beside it), so the
shared machine's slow and fast spells cancel; times are also given in forward-pass equivalents (÷ the
median time of one forward pass of the 64 digits). Where the methods are the same (IBP, CROWN) the
bounds must agree to 1e-5 relative to 1 + |bound| (float32 rounding on margins near 20), and to 1e-9 in
float64; α-CROWN's differ by design (ours: one α per row and neuron, the best iterate kept, CROWN's slopes
to start), so the table gives each side's mean lower bound and share verified.

**Exact.** A 64-32-32-10 MLP (64 ReLUs); for ``--exact-digits`` test digits at each ε, our MILP
(:func:`safetylab.verify.exact.verify_exact`, HiGHS) and Marabou 2.0.0 (``maraboupy``, the network written
from its weights) decide robustness with ``--time-limit`` seconds per digit, digit by digit, the sides
alternating which goes first. Each side's time covers what a user's call does: ours traces, screens
with CROWN, attacks with 20 steps of PGD and then solves; Marabou's is the network build and the solve
(its counterexample is checked on the network outside the timing). Three comparisons:

- *end to end*: ours as above against Marabou with default options and one disjunction of the nine
  negated margins per digit;
- *solver against solver*: only the digits that neither CROWN nor the attack decides (the screen and
  the attack given to Marabou too), ours without them (``attack=False``; the CROWN screen does not pass on
  these digits) against Marabou on the same digits;
- *Marabou's options*: on those digits too, nine per-target queries (stopping at the first satisfiable
  one) instead of the disjunction, and ``tighteningStrategy="sbt"`` instead of DeepPoly.

The verdicts must never contradict, and counterexamples are checked on the network.

    python benchmarks/verify_vs_peers.py [--rounds 15] [--eps 0.02]

Needs bound-propagation and maraboupy next to safetylab (see ``benchmarks/requirements-verify.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
                iterations: int = 20, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """bound-propagation's bounds of ``C f`` (built anew per call, as a user would per batch); ``model``
    frozen by the caller. α-CROWN: ``iterations`` Adam steps of learning rate ``lr`` (its betas kept)."""
    factory = BoundModelFactory(adaptive_relu=True, alpha_iterations=iterations,
                                alpha_optimizer_params={"lr": lr, "betas": (0.5, 0.99)})
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


def marabou_verify(model: nn.Sequential, lower: np.ndarray, upper: np.ndarray, label: int, time_limit: float,
                   per_target: bool = False, tightening: str = "deeppoly"):
    """Marabou on one box: "verified" (the negated property is unsat), "falsified" with its input, or
    "unknown" at the time limit (whole seconds). The negated property is one disjunction over the other
    classes, or with ``per_target`` one query per class (the first satisfiable one falsifies)."""
    if per_target:
        results = []
        for j in range(model[-1].out_features):
            if j != label:
                results.append(_marabou_query(model, lower, upper, label, [j], time_limit, tightening))
                if results[-1][0] == "falsified":
                    return results[-1]
        return ("verified", None) if all(status == "verified" for status, _ in results) else ("unknown", None)
    others = [j for j in range(model[-1].out_features) if j != label]
    return _marabou_query(model, lower, upper, label, others, time_limit, tightening)


def _marabou_query(model: nn.Sequential, lower: np.ndarray, upper: np.ndarray, label: int, targets: list[int],
                   time_limit: float, tightening: str):
    """Is f_label − f_j <= 0 for some j in ``targets``, over the box? (one disjunction)"""
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
    for j in targets:  # f_y − f_j <= 0
        equation = MarabouUtils.Equation(MarabouCore.Equation.LE)
        equation.addAddend(1.0, current[label])
        equation.addAddend(-1.0, current[j])
        equation.setScalar(0.0)
        disjuncts.append([equation])
    if len(disjuncts) == 1:
        net.addEquation(disjuncts[0][0])
    else:
        net.addDisjunctionConstraint(disjuncts)
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=max(1, math.ceil(time_limit)),
                                    tighteningStrategy=tightening)
    with quiet_stdout():
        status, values, _ = net.solve(verbose=False, options=options)
    if status == "unsat":
        return "verified", None
    if status == "sat":
        return "falsified", torch.tensor([values[v] for v in inputs], dtype=torch.float64)
    return "unknown", None


# ----------------------------------------------------------------------------- the run
def paired(calls: dict[str, object], rounds: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """One warm-up call of each side, then ``rounds`` rounds of one call each, the sides in a rotating
    order; returns each side's times (one per round) and its last output."""
    outputs = {side: call() for side, call in calls.items()}
    times: dict[str, list[float]] = {side: [] for side in calls}
    sides = list(calls)
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            start = time.perf_counter()
            outputs[side] = calls[side]()
            times[side].append(time.perf_counter() - start)
    return times, outputs


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """The median over rounds of ``slow``'s time over ``fast``'s, with its quartiles."""
    per_round = sorted(a / b for a, b in zip(times[slow], times[fast]))
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return f"{statistics.median(per_round):.2f} ({q[0]:.2f}-{q[2]:.2f})"


def bounds_benchmark(args, x_train, y_train, x_test, y_test) -> None:
    model = mlp((64, 256, 256, 10), x_train, y_train)
    frozen = copy.deepcopy(model).requires_grad_(False)  # the peer at its best: no weight gradients
    x, y = x_test[:64], y_test[:64]
    region, spec = linf_ball(x, args.eps), margin_spec(y, 10)
    layers = trace(model, (64,))
    with torch.no_grad():
        forward = statistics.median(paired({"forward": lambda: model(x)}, 50)[0]["forward"])
    print(f"bounds: MLP 64-256-256-10 (test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}), "
          f"64 digits, L∞ eps {args.eps:g}, margins (9 rows a digit); one forward pass {forward * 1e3:.3f} ms; "
          f"{args.rounds} rounds, sides interleaved")
    print(f"{'method':<30} {'side':<18} {'ms':>9} {'fwd passes':>11} {'mean lower':>11} {'verified':>9} "
          f"{'max rel.diff':>12} {'peer / ours (quartiles)':>24}")

    def row(label, side, times, lower, diff="", speed=""):
        t = statistics.median(times)
        print(f"{label:<30} {side:<18} {t * 1e3:9.1f} {t / forward:11.0f} {lower.mean():11.4f} "
              f"{(lower > 0).all(1).float().mean():9.3f} {diff:>12} {speed:>24}")

    for method, iterations in (("ibp", None), ("crown", None), ("alpha-crown", 5), ("alpha-crown", 10),
                               ("alpha-crown", 20)):
        k = iterations or 20
        calls = {"ours": lambda m=method, k=k: ours(layers, region, spec, m, k),
                 "peer": lambda m=method, k=k: peer_bounds(frozen, region.lower, region.upper, spec, m, k)}
        if iterations == 20:  # the peer's default learning rate; ours with fewer iterations, for equal bounds
            calls["peer-default"] = lambda: peer_bounds(frozen, region.lower, region.upper, spec, "alpha-crown", 20,
                                                        lr=0.01)
            for fewer in (5, 10):
                calls[f"ours-{fewer}"] = lambda k=fewer: ours(layers, region, spec, "alpha-crown", k)
        rounds = args.rounds if method != "alpha-crown" else max(3, args.rounds // 3)
        times, out = paired(calls, rounds)
        (ol, ou), (pl, pu) = out["ours"], out["peer"]
        diff = max(((ol - pl).abs() / (1 + pl.abs())).max().item(), ((ou - pu).abs() / (1 + pu.abs())).max().item())
        label = method if iterations is None else f"{method} ({iterations} it.)"
        row(label, "safetylab", times["ours"], ol, f"{diff:.2e}", ratio(times, "peer", "ours"))
        row(label, "bound-propagation", times["peer"], pl)
        if "peer-default" in out:
            row(f"{label}, lr 0.01", "bound-propagation", times["peer-default"], out["peer-default"][0], "",
                ratio(times, "peer-default", "ours"))
            for fewer in (5, 10):  # equal or tighter bounds than the peer's 20 iterations, in fewer of ours
                lower = out[f"ours-{fewer}"][0]
                tighter = "tighter" if lower.mean() >= pl.mean() else "looser"
                row(f"{method} ({fewer} it., {tighter})", "safetylab", times[f"ours-{fewer}"], lower, "",
                    ratio(times, "peer", f"ours-{fewer}"))
        if method != "alpha-crown":
            assert diff <= 1e-5, f"{method}: the bounds disagree by {diff:.2e}"
    # in float64 the same methods must agree to rounding: the float32 differences are float32's
    frozen64, region64 = copy.deepcopy(frozen).double(), linf_ball(x.double(), args.eps)
    layers64 = trace(frozen64, (64,))
    for method in ("ibp", "crown"):
        ol, ou = ours(layers64, region64, spec.double(), method)
        pl, pu = peer_bounds(frozen64, region64.lower, region64.upper, spec.double(), method)
        diff = max((ol - pl).abs().max().item(), (ou - pu).abs().max().item())
        print(f"{method} in float64: max |safetylab − bound-propagation| = {diff:.1e}")
        assert diff <= 1e-9, f"{method}: the float64 bounds disagree by {diff:.2e}"


def exact_benchmark(args, x_train, y_train, x_test, y_test) -> None:
    model = mlp((64, 32, 32, 10), x_train, y_train)
    model64 = copy.deepcopy(model).double()
    x, y = x_test[:args.exact_digits], y_test[:args.exact_digits]
    print(f"\nexact: MLP 64-32-32-10 (test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}), "
          f"{len(x)} digits per eps, at most {args.time_limit:g} s a digit, the sides alternating per digit")
    print(f"{'eps':>6} {'comparison':<34} {'side':<22} {'digits':>6} {'verified':>9} {'falsified':>10} "
          f"{'unknown':>8} {'seconds':>8} {'Marabou / ours':>15}")

    def checked(status, cex, label):  # a counterexample of Marabou's, checked on the network
        if cex is not None:
            with torch.no_grad():
                out = model64(cex.unsqueeze(0))[0]
            assert out[label] - torch.cat([out[:label], out[label + 1:]]).max() <= 1e-6
        return status

    def run(sides, digits, eps):
        """Each side on each of ``digits``, alternating which goes first; verdicts and seconds per side."""
        verdicts, seconds = {s: [] for s in sides}, {s: 0.0 for s in sides}
        for n, i in enumerate(digits):
            for side in (list(sides) if n % 2 == 0 else list(sides)[::-1]):
                start = time.perf_counter()
                status, cex = sides[side](i, eps)
                seconds[side] += time.perf_counter() - start
                verdicts[side].append(checked(status, cex, int(y[i])))
        return verdicts, seconds

    decided_by = {}  # digit -> how our end-to-end run decided it: "crown", "attack" or "milp"

    def ours_call(attack: bool):
        def call(i, eps):
            result = verify_exact(model, linf_ball(x[i:i + 1], eps), margin_spec(y[i:i + 1], 10),
                                  time_limit=args.time_limit, attack=attack)[0]
            if attack:
                decided_by[i] = result.method
            return result.status, None
        return call

    def marabou_call(per_target: bool = False, tightening: str = "deeppoly"):
        def call(i, eps):
            box = linf_ball(x[i:i + 1], eps)
            return marabou_verify(model, box.lower[0].double().numpy(), box.upper[0].double().numpy(), int(y[i]),
                                  args.time_limit, per_target, tightening)
        return call

    def report(eps, comparison, verdicts, seconds, digits):
        for side in verdicts:
            counts = [verdicts[side].count(s) for s in ("verified", "falsified", "unknown")]
            speed = "" if side.startswith("safetylab") else f"{seconds[side] / max(seconds[first], 1e-9):.2f}"
            print(f"{eps:6g} {comparison:<34} {side:<22} {len(digits):6d} {counts[0]:9d} {counts[1]:10d} "
                  f"{counts[2]:8d} {seconds[side]:8.2f} {speed:>15}")
        clash = [sum({a, b} == {"verified", "falsified"} for a, b in zip(verdicts[first], verdicts[s]))
                 for s in verdicts]
        assert not any(clash), f"eps {eps}: the verifiers contradict each other ({clash})"

    for eps in args.exact_eps:
        everything = range(len(x))
        first = "safetylab"
        verdicts, seconds = run({"safetylab": ours_call(True), "Marabou": marabou_call()}, everything, eps)
        report(eps, "end to end", verdicts, seconds, everything)
        # the digits that neither CROWN nor the attack decides: what the solvers alone must settle
        hard = [i for i in everything if decided_by[i] == "milp"]
        if not hard:
            print(f"{eps:6g} {'solver against solver':<34} (CROWN and the attack decide every digit)")
            continue
        first = "safetylab, no attack"
        verdicts, seconds = run({"safetylab, no attack": ours_call(False), "Marabou": marabou_call(),
                                 "Marabou, per target": marabou_call(per_target=True),
                                 "Marabou, sbt": marabou_call(tightening="sbt")}, hard, eps)
        report(eps, "solver against solver (undecided)", verdicts, seconds, hard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per bound method (α-CROWN: a third)")
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
