"""Complete verification of small ReLU networks by mixed-integer linear programming.

Sound bounds (:mod:`.bounds`) may fail to verify a property that holds; a complete verifier always
decides it, at a cost exponential in the number of unstable neurons in the worst case. Following Tjeng,
Xiao & Tedrake 2019 ("Evaluating Robustness of Neural Networks with Mixed Integer Programming"), the
network over a box region is written as a mixed-integer linear program (MILP) whose optimum is the exact
minimum of a specification row ``c · f(x)``, and solved with HiGHS (``scipy.optimize.milp``). This module
holds:

- :func:`dense_layers`: the traced chain as explicit affine maps ``(W_k, b_k)`` between activations;
- :func:`activation_constraints`: the exact encoding of one activation given its input interval;
- :func:`minimize_output`: the exact minimum of ``c · f(x)`` over a box, and an input that attains it;
- :func:`verify_exact`: per example, verified / falsified (with a checked counterexample) / unknown.

The variables are the input ``x``, and for every activation ``k`` its input ``z_k``, its output ``h_k``
and one binary ``δ`` per unstable neuron; equality rows tie ``z_k = W_k h_{k−1} + b_k``. The activations'
input intervals ``[l, u]`` come from CROWN (or IBP, α-CROWN), computed in float64. Verdicts are exact up
to the solver's tolerances (feasibility 1e-7, gap 1e-6): a row whose optimum lies within them of zero,
or whose counterexample does not survive a check on the real network, is reported as "unknown", never
with a wrong verdict.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from numbers import Real

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds as VariableBounds
from scipy.optimize import LinearConstraint, milp
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.bounds import METHODS, alpha_crown, crown, ibp
from safetylab.verify.network import Layer, check_layers, map_tensors, trace
from safetylab.verify.regions import Region, check_region, check_spec

MIP_REL_GAP = 1e-6  # HiGHS stops when (best − bound) / |best| falls below this
BOX_TOLERANCE = 1e-6  # how far outside the box a solver's input may lie before it is clipped back
BOUND_METHODS = {"ibp": ibp, "crown": crown, "alpha-crown": alpha_crown}
Affine = tuple[torch.Tensor, torch.Tensor]
_LIBC = ctypes.CDLL(None) if os.name == "posix" else None  # C's stdio, to flush what the solver printed
_STDOUT_LOCK = threading.Lock()  # one redirection at a time: two would restore each other's descriptor


@dataclass(frozen=True)
class Minimum:
    """The result of :func:`minimize_output`: ``c · f(x)`` over the region is at least ``bound``; ``x``
    (``input_shape``, float64, or None when the solver found no input in time) attains ``value`` in the
    program. When ``optimal``, ``value`` is the minimum (``value − bound`` is within the solver's gap);
    ``message`` is the solver's."""

    value: float | None
    bound: float
    x: torch.Tensor | None
    optimal: bool
    message: str


@dataclass(frozen=True)
class ExactResult:
    """The verdict on one example: ``"verified"`` (every row of ``C f(x)`` is positive on the whole region),
    ``"falsified"`` (``counterexample``, in the region, makes row ``row`` ``<= 0`` on the real network) or
    ``"unknown"`` (a time limit, or a case within the solver's tolerances; ``note`` says which).

    ``minimum`` holds per row the exact minimum of the row where ``optimal`` is true, else the best proven
    lower bound (the bounds' or the solver's). ``method`` is the bound method when the bounds alone
    verified the example, ``"attack"`` when projected gradient descent falsified it, else ``"milp"``;
    ``seconds`` the wall time spent on the example."""

    status: str
    minimum: list[float]
    optimal: list[bool]
    counterexample: torch.Tensor | None
    row: int | None
    method: str
    seconds: float
    note: str = ""


# ----------------------------------------------------------------------------- the network as matrices
def _float64(layer: Layer) -> Layer:
    """The layer with every tensor (its operation's and its own) in float64, cut from autograd, so the
    program is built in float64."""
    return map_tensors(layer, lambda t: t.detach().double())


def _first_tensor(layers: list[Layer], default: torch.Tensor) -> torch.Tensor:
    """A tensor of the layers (their dtype and device), or ``default`` when none holds one."""
    return next((t for layer in layers for t in vars(layer.op).values() if isinstance(t, torch.Tensor)), default)


def _dense(segment: list[Layer], shape: tuple[int, ...], like: torch.Tensor) -> Affine:
    """The affine map of consecutive affine layers (the identity when there are none) as ``(W, b)``:
    ``b = g(0)`` and column ``i`` of ``W`` is ``g(e_i) − b``, from one pass over the identity basis."""
    n = math.prod(shape)
    basis = torch.cat([like.new_zeros(1, n), torch.eye(n, dtype=like.dtype, device=like.device)])
    out = basis.reshape(n + 1, *shape)
    for layer in segment:
        out = layer.forward(out)
    out = out.flatten(1)
    return (out[1:] - out[0]).T, out[0]


def dense_layers(layers: list[Layer]) -> tuple[list[Affine], list[float]]:
    """The chain as ``f = A_L ∘ σ_L ∘ … ∘ σ_1 ∘ A_0``: the affine maps ``A_k = (W_k, b_k)`` between
    activations (``L + 1`` of them, on flattened vectors, in the layers' dtype) and the activations'
    negative slopes ``s_k`` (``σ(z) = max(z, s z)``; 0 for ReLU); float64 when no layer holds a tensor."""
    like = _first_tensor(layers, torch.zeros((), dtype=torch.float64))
    maps: list[Affine] = []
    slopes: list[float] = []
    segment: list[Layer] = []
    shape = layers[0].in_shape
    for layer in layers:
        if layer.is_activation:
            maps.append(_dense(segment, shape, like))
            slopes.append(layer.op.slope)
            segment, shape = [], layer.out_shape
        else:
            segment.append(layer)
    maps.append(_dense(segment, shape, like))
    return maps, slopes


# ----------------------------------------------------------------------------- the program
def activation_constraints(lower: np.ndarray, upper: np.ndarray, slope: float) -> tuple[np.ndarray, ...]:
    """The exact encoding of ``h = max(z, s z)`` for ``z ∈ [l, u]`` with ``0 <= s < 1``, one neuron per
    entry, as rows ``lo <= a_z z + a_h h + a_δ δ <= hi``; returns ``(neuron, a_z, a_h, a_δ, lo, hi)``, one
    entry per row (``a_δ`` is 0 for a stable neuron, which has no binary).

    A stable neuron is linear: ``h = z`` when ``l >= 0``, ``h = s z`` when ``u <= 0``. An unstable one
    (``l < 0 < u``) gets a binary ``δ`` (1: active) and the big-M constraints of Tjeng et al. 2019, which
    for ReLU (``s = 0``) read ``h >= z, h >= 0, h <= z − l (1 − δ), h <= u δ``. For LeakyReLU they are

        h >= z,   h >= s z,   h <= z − (1 − s) l (1 − δ),   h <= s z + (1 − s) u δ.

    With ``δ = 1`` the first and third give ``h = z``; then ``h >= s z`` forces ``z >= 0`` and the fourth
    is ``z <= u``. With ``δ = 0`` the second and fourth give ``h = s z``; then ``h >= z`` forces ``z <= 0``
    and the third is ``z >= l``. So the feasible ``(z, h)`` are exactly the graph of σ on ``[l, u]``."""
    unstable = (lower < 0) & (upper > 0)
    stable, cut = np.flatnonzero(~unstable), np.flatnonzero(unstable)
    low, high, s = lower[cut], upper[cut], slope
    ones, zeros, free = np.ones(len(cut)), np.zeros(len(cut)), np.full(len(cut), np.inf)
    neuron = np.concatenate([stable, cut, cut, cut, cut])
    a_z = np.concatenate([-np.where(lower[stable] >= 0, 1.0, s), -ones, -s * ones, -ones, -s * ones])
    a_h = np.ones(len(neuron))
    a_delta = np.concatenate([np.zeros(len(stable)), zeros, zeros, -(1 - s) * low, -(1 - s) * high])
    lo = np.concatenate([np.zeros(len(stable)), zeros, zeros, -free, -free])
    hi = np.concatenate([np.zeros(len(stable)), free, free, -(1 - s) * low, zeros])
    return neuron, a_z, a_h, a_delta, lo, hi


@dataclass(frozen=True)
class _Program:
    """The constraints of one example's MILP; the objective ``c (W_L h_L + b_L)`` reads ``h_L``, the
    variables ``last`` (``x`` when the network has no activation)."""

    constraints: LinearConstraint
    bounds: VariableBounds
    integrality: np.ndarray
    last: slice
    weight: np.ndarray
    bias: np.ndarray
    input_shape: tuple[int, ...]


def _encode(maps: list[Affine], slopes: list[float], pre_activation: list[tuple[torch.Tensor, torch.Tensor]],
            region: Region) -> _Program:
    """The MILP of the network over the box of a one-example ``region``, with the activations' input
    intervals ``pre_activation`` (each ``(1, *shape)``). Variables are laid out as ``x``, then per
    activation ``z_k, h_k, δ_k``."""
    lower, upper = region.lower.double().flatten().cpu().numpy(), region.upper.double().flatten().cpu().numpy()
    var_lo, var_hi, integer = [lower], [upper], [np.zeros(len(lower))]
    rows, cols, vals = [np.zeros(0, int)], [np.zeros(0, int)], [np.zeros(0)]
    row_lo, row_hi = [np.zeros(0)], [np.zeros(0)]
    count, constraints = len(lower), 0
    previous = slice(0, count)
    for (weight, bias), slope, (l_t, u_t) in zip(maps, slopes, pre_activation):
        weight, bias = weight.cpu().numpy(), bias.cpu().numpy()
        low, high = l_t.double().flatten().cpu().numpy(), u_t.double().flatten().cpu().numpy()
        n = len(bias)
        z, h = np.arange(count, count + n), np.arange(count + n, count + 2 * n)
        # z_k − W_k h_{k−1} = b_k
        r, c = np.nonzero(weight)
        rows += [constraints + np.arange(n), constraints + r]
        cols += [z, previous.start + c]
        vals += [np.ones(n), -weight[r, c]]
        row_lo.append(bias)
        row_hi.append(bias)
        constraints += n
        neuron, a_z, a_h, a_delta, lo, hi = activation_constraints(low, high, slope)
        unstable = np.flatnonzero((low < 0) & (high > 0))
        delta = np.full(n, -1)
        delta[unstable] = count + 2 * n + np.arange(len(unstable))
        index = constraints + np.arange(len(neuron))
        cut = a_delta != 0
        rows += [index, index, index[cut]]
        cols += [z[neuron], h[neuron], delta[neuron[cut]]]
        vals += [a_z, a_h, a_delta[cut]]
        row_lo.append(lo)
        row_hi.append(hi)
        constraints += len(neuron)
        var_lo += [low, np.maximum(low, slope * low), np.zeros(len(unstable))]
        var_hi += [high, np.maximum(high, slope * high), np.ones(len(unstable))]
        integer += [np.zeros(2 * n), np.ones(len(unstable))]
        previous = slice(count + n, count + 2 * n)
        count += 2 * n + len(unstable)
    matrix = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(constraints, count))
    weight, bias = maps[-1]
    return _Program(LinearConstraint(matrix, np.concatenate(row_lo), np.concatenate(row_hi)),
                    VariableBounds(np.concatenate(var_lo), np.concatenate(var_hi)), np.concatenate(integer),
                    previous, weight.cpu().numpy(), bias.cpu().numpy(), region.input_shape)


@contextmanager
def _c_stdout_discarded() -> Iterator[None]:
    """Discard what is written to file descriptor 1 meanwhile. HiGHS prints a developer line with C's
    ``printf`` when it repairs a solution ("HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();"), whatever its options say (scipy's default ``disp=False`` silences its log), and
    library code writes nothing to stdout. Python's buffer is flushed before and C's before the descriptor
    is restored (C holds the line until it flushes), so what others write before or after keeps its place."""
    with _STDOUT_LOCK:
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        try:
            yield
        finally:
            if _LIBC is not None:
                _LIBC.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def _solve(program: _Program, c: np.ndarray, time_limit: float) -> Minimum:
    """Minimise ``c · f(x)`` over the program with HiGHS within ``time_limit`` seconds."""
    objective = np.zeros(len(program.integrality))
    objective[program.last] = c @ program.weight
    const = float(c @ program.bias)
    constraints = [program.constraints] if program.constraints.A.shape[0] else []
    with _c_stdout_discarded():
        result = milp(objective, integrality=program.integrality, bounds=program.bounds, constraints=constraints,
                      options={"time_limit": time_limit, "mip_rel_gap": MIP_REL_GAP})
    optimal, dual = result.status == 0, result.mip_dual_bound
    value = None if result.x is None else float(result.fun) + const
    if dual is not None and np.isfinite(dual):
        bound = float(dual) + const
    else:  # no bound reported: a pure LP's optimum is its own bound; else nothing is proven
        bound = value if optimal else -math.inf
    x = None if result.x is None else torch.from_numpy(result.x[:math.prod(program.input_shape)].copy())
    return Minimum(value, bound, None if x is None else x.reshape(program.input_shape), optimal, result.message)


# ----------------------------------------------------------------------------- checks
def _check_time_limit(time_limit: object) -> float:
    if isinstance(time_limit, bool) or not isinstance(time_limit, Real) or not time_limit > 0:
        raise SafetylabError(f"time_limit must be a number of seconds > 0, got {time_limit!r}")
    return float(time_limit)


def _check_region(region: object, input_shape: tuple[int, ...] | None = None) -> Region:
    region = check_region(region, input_shape)
    if region.center is not None:
        raise SafetylabError("exact verification supports boxes and L∞ balls, got a region with an L2 ball "
                             "(l2_ball); use linf_ball or box")
    return region


def _check_bounds(bounds: object) -> str:
    if bounds not in METHODS:
        raise SafetylabError(f"bounds must be one of {', '.join(METHODS)}, got {bounds!r}")
    return bounds


def _one(region: Region, i: int) -> Region:
    return Region(region.lower[i:i + 1].double(), region.upper[i:i + 1].double())


# ----------------------------------------------------------------------------- public functions
def minimize_output(layers: list[Layer], region: Region, c: torch.Tensor, time_limit: float = 60.0,
                    bounds: str = "crown") -> Minimum:
    """The exact minimum of ``c · f(x)`` over the box of a one-example ``region`` (``c``: ``(K,)`` over
    the network's outputs) and an input attaining it, by the MILP of Tjeng et al. 2019 with the
    activations' input intervals from ``bounds``. Negate ``c`` for the maximum."""
    layers = check_layers(layers)
    region = _check_region(region, layers[0].in_shape)
    time_limit, bounds = _check_time_limit(time_limit), _check_bounds(bounds)
    if region.batch != 1:
        raise SafetylabError(f"region must hold one example, got a batch of {region.batch}")
    outputs = layers[-1].out_shape[0]
    if not isinstance(c, torch.Tensor) or c.shape != (outputs,) or c.is_complex() or not torch.isfinite(c).all():
        raise SafetylabError(f"c must be a tensor of shape ({outputs},) (one finite weight per output), "
                             f"got {tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    layers64, one = [_float64(layer) for layer in layers], _one(region, 0)
    with torch.no_grad():
        pre_activation = BOUND_METHODS[bounds](layers64, one, c.double().reshape(1, 1, -1)).pre_activation
        program = _encode(*dense_layers(layers64), pre_activation, one)
    return _solve(program, c.double().cpu().numpy(), time_limit)


def verify_exact(model_or_layers: nn.Module | list[Layer], region: Region, spec: torch.Tensor | None,
                 time_limit: float = 60.0, bounds: str = "crown", attack: bool = True) -> list[ExactResult]:
    """Decide, per example, whether every row of ``C f(x)`` (``spec``: ``(B, S, K)`` or ``(S, K)``, e.g.
    :func:`~safetylab.verify.regions.margin_spec`) is positive for every ``x`` in the box ``region``.

    Per example: if the lower bounds by ``bounds`` are already positive for every row, the example is
    verified without a MILP. Otherwise (with ``attack``) projected gradient descent looks for a
    counterexample first, since a solver proves a falsification only by solving the row to optimality.
    Then the rows are solved exactly (:func:`minimize_output`), the smallest
    bound first, within ``time_limit`` seconds for the example. A row whose program reaches a value
    ``<= 0`` gives a candidate input: it is clipped to the box (solver tolerance) and run through the real
    network in float64 and in the network's own dtype; only if both margins are ``<= 0`` is the example
    falsified, else the row is unknown and the next rows are tried. A row is verified when the solver
    proves its minimum positive; one that runs out of time without a counterexample makes the example
    unknown, unless another row falsifies it."""
    time_limit, bounds = _check_time_limit(time_limit), _check_bounds(bounds)
    region = _check_region(region)
    if isinstance(model_or_layers, nn.Module):
        layers = check_layers(trace(model_or_layers, region.input_shape))
        network: Callable[[torch.Tensor], torch.Tensor] = model_or_layers
    else:
        layers = check_layers(model_or_layers)
        network = partial(_run, layers)
    _check_region(region, layers[0].in_shape)
    layers64 = [_float64(layer) for layer in layers]
    net = _Network(layers64, *dense_layers(layers64), network, _first_tensor(layers, region.lower).dtype)
    spec = check_spec(spec, region.batch, layers[-1].out_shape[0], region.lower.double())
    results = []
    for i in range(region.batch):
        start = time.perf_counter()
        with torch.no_grad():
            result = _verify_one(net, _one(region, i), region.lower.dtype, spec[i], bounds, time_limit, start,
                                 attack)
        results.append(dataclasses.replace(result, seconds=time.perf_counter() - start))
    return results


def _run(layers: list[Layer], x: torch.Tensor) -> torch.Tensor:
    """The chain's output for a batch ``x``."""
    for layer in layers:
        x = layer.forward(x)
    return x


@dataclass(frozen=True)
class _Network:
    """The network as verification uses it: its layers and affine maps in float64 for the program, and
    the real network with its own dtype for checking counterexamples."""

    layers64: list[Layer]
    maps: list[Affine]
    slopes: list[float]
    run: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype


def _verify_one(net: _Network, region: Region, region_dtype: torch.dtype, spec: torch.Tensor, bounds: str,
                time_limit: float, start: float, attack: bool) -> ExactResult:
    """One example (``region`` in float64, ``spec`` ``(S, K)``): screen with the bounds, then solve rows
    until one is falsified or all are decided, within ``time_limit`` seconds of ``start``."""
    screen = BOUND_METHODS[bounds](net.layers64, region, spec.unsqueeze(0))
    minimum = screen.lower[0].tolist()
    optimal = [False] * len(minimum)
    proven = [m > 0 for m in minimum]
    if all(proven):
        return ExactResult("verified", minimum, optimal, None, None, bounds, 0.0)
    attacked = _attack(net, region, region_dtype, spec) if attack else None
    if attacked is not None:
        return ExactResult("falsified", minimum, optimal, attacked[0], attacked[1], "attack", 0.0)
    program = _encode(net.maps, net.slopes, screen.pre_activation, region)
    notes = []
    for row in np.argsort(minimum):
        row = int(row)
        if proven[row]:
            break
        left = time_limit - (time.perf_counter() - start)
        if left <= 0:
            notes.append(f"time limit reached before row {row}")
            break
        c = spec[row]
        found = _solve(program, c.cpu().numpy(), left)
        minimum[row] = found.value if found.optimal else max(minimum[row], found.bound)
        optimal[row] = found.optimal
        if found.value is not None and found.value <= 0:
            x, why = _confirm(found.x, region, region_dtype, c, net)
            if x is not None:
                return ExactResult("falsified", minimum, optimal, x, row, "milp", 0.0)
            notes.append(f"row {row}: the solver's input (value {found.value:.3g}) {why}")
        elif found.bound > 0:
            proven[row] = True
        elif found.optimal:
            notes.append(f"row {row}: minimum {found.value:.3g} lies within the solver's tolerance of 0")
        else:
            notes.append(f"row {row}: undecided, best bound {found.bound:.3g} ({found.message})")
    return ExactResult("verified" if all(proven) else "unknown", minimum, optimal, None, None, "milp", 0.0,
                       "; ".join(notes))


def _attack(net: _Network, region: Region, region_dtype: torch.dtype, spec: torch.Tensor,
            steps: int = 20) -> tuple[torch.Tensor, int] | None:
    """A counterexample by projected gradient descent on the smallest row of ``spec`` (Madry et al. 2018,
    sign steps of 2.5 · radius / ``steps``) from the box's centre, checked as the solver's are: a
    falsification costs a few forward passes instead of a program solved to optimality."""
    lower, upper = region.lower[0], region.upper[0]
    x, step = (lower + upper) / 2, 2.5 * (upper - lower) / 2 / steps
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad((spec @ _run(net.layers64, x.unsqueeze(0))[0]).min(), x)
        x = torch.minimum(torch.maximum(x.detach() - step * gradient.sign(), lower), upper)
        values = spec @ _run(net.layers64, x.unsqueeze(0))[0]
        if values.min() <= 0:
            row = int(values.argmin())
            found, _ = _confirm(x, region, region_dtype, spec[row], net)
            if found is not None:
                return found, row
    return None


def _confirm(x: torch.Tensor, region: Region, region_dtype: torch.dtype, c: torch.Tensor,
             net: _Network) -> tuple[torch.Tensor | None, str]:
    """The solver's input as a counterexample in the region's dtype, if it lies in the box (up to
    :data:`BOX_TOLERANCE`, then clipped) and the real network's row ``c`` is ``<= 0`` at it in float64
    and in its own dtype; else None and why not."""
    lower, upper = region.lower[0], region.upper[0]
    x = x.to(lower.device)
    outside = float(torch.maximum(lower - x, x - upper).max())
    if outside > BOX_TOLERANCE:
        return None, f"lies {outside:.3g} outside the region"
    x = torch.minimum(torch.maximum(x, lower), upper).to(region_dtype)
    exact = float(c @ _run(net.layers64, x.double().unsqueeze(0))[0])
    native = float(c.to(net.dtype) @ net.run(x.to(net.dtype).unsqueeze(0))[0])
    if exact > 0 or native > 0:
        return None, f"gives margins {exact:.3g} (float64) and {native:.3g} ({net.dtype}) on the network, not <= 0"
    return x, ""
