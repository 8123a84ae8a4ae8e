"""Sound bounds on a network's outputs over an input region: IBP, CROWN and α-CROWN.

For a chain of layers (:func:`safetylab.verify.network.trace`), a region (:mod:`.regions`) and a
specification ``C``, each method returns lower and upper bounds of ``C · f(x)`` valid for every ``x`` in
the region:

- **IBP** (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training Verifiably
  Robust Models"): intervals pushed through each layer, ``W x̂ + b ± |W| r``; the specification is folded
  into the last linear layer (``C W``), which is tighter than applying it to the output interval.
- **CROWN** (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General Activation
  Functions"): a linear bound on ``C f`` carried backwards, each activation replaced by linear lower and
  upper lines on its input interval (:func:`relaxation`), then minimised over the region in closed form.
  The activations' input intervals come from the same backward pass run from every unstable neuron of
  the layer, intersected with IBP's.
- **α-CROWN** (Xu et al. 2021, "Fast and Complete: Enabling Complete Neural Network Verification with
  Rapid and Massively Parallel Incomplete Verifiers"): CROWN with the lower lines' slopes α, one per
  output row and neuron, chosen by projected gradient ascent on the bound; never looser than CROWN,
  whose slopes start it.

The network, the region and the specification are brought to one dtype, the widest of theirs: a float32
network over a float64 region is bounded in float64 with its weights widened, which is exact, whereas
rounding the region to float32 could move its edges inward and leave part of it unbounded. Every constant
is made in that dtype (a Python number alone would make a float32 tensor, and a float64 bound that uses
LeakyReLU's slope 0.1 rounded to float32 is unsound).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial, reduce

import torch
from torch import nn

from safetylab.core.errors import SafetylabError
from safetylab.verify.network import FlattenOp, Layer, LinearOp, check_layers, map_tensors, trace
from safetylab.verify.regions import Region, check_region, check_spec, concretize

METHODS = ("ibp", "crown", "alpha-crown")
Interval = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Bounds:
    """``lower <= C f(x) <= upper`` for every ``x`` in the region, ``(B, S)`` each; ``pre_activation``
    holds each activation's input interval, in order."""

    lower: torch.Tensor
    upper: torch.Tensor
    pre_activation: list[Interval]
    method: str

    def verified(self) -> torch.Tensor:
        """Per example: every row's lower bound is positive (``(B,)`` bool)."""
        return (self.lower > 0).all(-1)


def relaxation(lower: torch.Tensor, upper: torch.Tensor, slope: float,
               alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear bounds ``a_l z <= σ(z) <= a_u z + b_u`` for ``z ∈ [l, u]`` and ``σ(z) = max(z, s z)``
    (ReLU for ``s = 0``), element-wise; returns ``(a_l, a_u, b_u)``.

    Stable neurons are exact (``a_l = a_u = 1`` for ``l >= 0``, ``s`` for ``u <= 0``). For an unstable one
    the upper line is the chord through ``(l, s l)`` and ``(u, u)``: slope ``(u − s l) / (u − l)``,
    intercept ``u (1 − slope)``; any line through the origin with slope in ``[s, 1]`` lies below ``σ``, and
    CROWN takes ``1`` when ``u >= −l``, else ``s`` — the one with the smaller area between it and ``σ``
    (Zhang et al. 2018). ``alpha``, when given, is that slope instead (α-CROWN), clamped to ``[s, 1]``."""
    active, inactive = lower >= 0, upper <= 0
    unstable = ~(active | inactive)
    width = (upper - lower).clamp(min=1e-12)
    s = lower.new_tensor(slope)  # in the bounds' dtype: where(cond, 1.0, slope) would be float32
    stable = torch.where(active, 1.0, s)  # the exact slope of a stable neuron
    chord = torch.where(unstable, (upper - slope * lower) / width, stable)
    intercept = torch.where(unstable, upper * (1 - chord), 0.0)
    if alpha is None:
        return torch.where(unstable, torch.where(upper >= -lower, 1.0, s), stable), chord, intercept
    # one fused product on the (many-row) slopes: stable neurons keep their slope, unstable ones take α
    return torch.addcmul(torch.where(unstable, 0.0, stable), alpha.clamp(slope, 1.0), unstable), chord, intercept


def backward_pass(layers: list[Layer], a: torch.Tensor, pre_activation: list[Interval],
                  alphas: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the linear function ``A · (output of layers)`` back to the network's input as a lower bound
    ``A' x + c``: affine layers move it exactly (``A W``, plus ``A b`` into ``c``); an activation takes
    its lower line where a coefficient is positive and its upper line where it is negative.

    ``a`` is ``(B, S, *output_shape)``; ``pre_activation`` the input interval of each activation in
    ``layers``; ``alphas`` optional lower slopes per activation, ``(B, S, *shape)``. Returns ``A'``
    ``(B, S, *input_shape)`` and ``c`` ``(B, S)``."""
    const = a.new_zeros(a.shape[:2])
    index = len(pre_activation)
    for layer in reversed(layers):
        if layer.is_activation:
            index -= 1
            lower, upper = pre_activation[index]
            alpha = None if alphas is None else alphas[index]
            below, chord, intercept = relaxation(lower.unsqueeze(1), upper.unsqueeze(1), layer.op.slope, alpha)
            negative = a.clamp(max=0)
            const = const + torch.einsum("bsn,bn->bs", negative.flatten(2), intercept.flatten(1))
            a = (a - negative) * below + negative * chord
        else:
            const = const + layer.bias_term(a)
            a = layer.backward(a)
    return a, const


def _interval_step(layer: Layer, lower: torch.Tensor, upper: torch.Tensor) -> Interval:
    """One layer of interval arithmetic: ``W x̂ + b ± |W| r``, or the monotone activation on both ends."""
    if layer.is_activation:
        return layer.forward(lower), layer.forward(upper)
    mid, rad = layer.forward((upper + lower) / 2), layer.forward_abs((upper - lower) / 2)
    return mid - rad, mid + rad


def _first_step(layers: list[Layer], index: torch.Tensor, like: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, list[Layer]]:
    """Unit rows ``e_i`` on the output of ``layers`` for the flat neurons ``index`` (B, c), moved back
    through the last layer when it is affine: the coefficients, the constant, and the layers still to go."""
    if not layers[-1].is_activation:
        a, const = layers[-1].unit_rows(index, like.dtype)
        return a, const, layers[:-1]
    rows = like.new_zeros(*index.shape, like[0].numel()).scatter_(-1, index.unsqueeze(-1), 1.0)
    return rows.reshape(*index.shape, *like.shape[1:]), like.new_zeros(index.shape), layers


def _refine(layers: list[Layer], region: Region, lower: torch.Tensor, upper: torch.Tensor,
            pre_activation: list[Interval], budget: int = 1 << 24) -> Interval:
    """Tighten the interval of the output of ``layers`` with CROWN, for the
    neurons it leaves unstable: each example bounds its own unstable neurons (padded to the largest
    count, the padding discarded), from below and from above, in chunks of at most ``budget``
    coefficients. The first step back from a unit row is a row of the last layer's matrix."""
    batch, shape = lower.shape[0], lower.shape[1:]
    unstable = ((lower < 0) & (upper > 0)).flatten(1)
    count = unstable.sum(1)
    k = int(count.max())
    if k == 0:
        return lower, upper
    order = torch.argsort(unstable.to(torch.uint8), dim=1, descending=True, stable=True)[:, :k]  # unstable first
    chunk = max(1, budget // (2 * batch * max(region.lower[0].numel(), lower[0].numel())))
    below, above = [], []
    for start in range(0, k, chunk):
        a, const, rest = _first_step(layers, order[:, start:start + chunk], lower)
        a_in, c = backward_pass(rest, torch.cat([a, -a], 1), pre_activation)
        found = concretize(a_in, c + torch.cat([const, -const], 1), region)
        below.append(found[:, :a.shape[1]])
        above.append(-found[:, a.shape[1]:])
    valid = torch.arange(k, device=lower.device) < count.unsqueeze(1)
    lower, upper = lower.flatten(1).clone(), upper.flatten(1).clone()
    old_lower, old_upper = lower.gather(1, order), upper.gather(1, order)
    lower.scatter_(1, order, torch.where(valid, torch.maximum(old_lower, torch.cat(below, 1)), old_lower))
    upper.scatter_(1, order, torch.where(valid, torch.minimum(old_upper, torch.cat(above, 1)), old_upper))
    return lower.reshape(batch, *shape), upper.reshape(batch, *shape)


def _ibp_is_exact(layers: list[Layer], region: Region) -> bool:
    """IBP's interval is already the exact range for one affine layer over a box (flattening aside)."""
    weighted = [layer for layer in layers if not isinstance(layer.op, FlattenOp)]
    return region.center is None and len(weighted) == 1 and not weighted[0].is_activation


def activation_bounds(layers: list[Layer], region: Region, method: str = "crown") -> tuple[list[Interval], Interval]:
    """The input interval of every activation, and the interval of the last layer's input: by IBP, or
    (``method="crown"``) tightened layer by layer with CROWN where IBP leaves a neuron unstable."""
    lower, upper = region.lower, region.upper
    pre_activation: list[Interval] = []
    for j, layer in enumerate(layers):
        if layer.is_activation:
            if method != "ibp" and not _ibp_is_exact(layers[:j], region):
                lower, upper = _refine(layers[:j], region, lower, upper, pre_activation)
            pre_activation.append((lower, upper))
        if j < len(layers) - 1:
            lower, upper = _interval_step(layer, lower, upper)
    return pre_activation, (lower, upper)


def _prepare(layers: list[Layer], region: Region, spec: torch.Tensor | None,
             ) -> tuple[list[Layer], Region, torch.Tensor]:
    """The layers, the region and the specification ``(B, S, K)``, checked to fit together and cast to the
    widest of their dtypes (widening is exact; see the module's docstring)."""
    layers = check_layers(layers)
    region = check_region(region, layers[0].in_shape)
    spec = check_spec(spec, region.batch, layers[-1].out_shape[0], region.lower)
    tensors = [t for layer in layers for t in (*vars(layer.op).values(), layer.matrix) if isinstance(t, torch.Tensor)]
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors), spec.dtype)
    cast = partial(torch.Tensor.to, dtype=dtype)
    if any(t.dtype != dtype for t in tensors):
        layers = [map_tensors(layer, cast) for layer in layers]
    if region.lower.dtype != dtype:
        region = map_tensors(region, cast)
    return layers, region, spec.to(dtype)


def ibp(layers: list[Layer], region: Region, spec: torch.Tensor | None = None) -> Bounds:
    """Interval bound propagation; the specification is folded into a final Linear layer."""
    layers, region, spec = _prepare(layers, region, spec)
    pre_activation, (lower, upper) = activation_bounds(layers, region, "ibp")
    last = layers[-1]
    if isinstance(last.op, LinearOp):
        weight, bias = spec @ last.op.weight, spec @ last.op.bias  # (B, S, in), (B, S)
    else:
        lower, upper = _interval_step(last, lower, upper)
        weight, bias = spec, spec.new_zeros(spec.shape[:2])
    mid, rad = ((upper + lower) / 2).unsqueeze(-1), ((upper - lower) / 2).unsqueeze(-1)
    center, spread = (weight @ mid).squeeze(-1) + bias, (weight.abs() @ rad).squeeze(-1)
    return Bounds(center - spread, center + spread, pre_activation, "ibp")


def _output_rows(spec: torch.Tensor) -> torch.Tensor:
    """``[C; −C]``: lower bounds of these rows are the lower and (negated) upper bounds of ``C f``."""
    return torch.cat([spec, -spec], 1)


def crown(layers: list[Layer], region: Region, spec: torch.Tensor | None = None, intermediate: str = "crown") -> Bounds:
    """CROWN bounds of ``C f(x)`` over the region. ``intermediate="ibp"`` takes the activations' input
    intervals from IBP alone: CROWN-IBP (Zhang et al. 2020, "Towards Stable and Efficient Training of
    Verifiably Robust Neural Networks"), one backward pass in all, as certified training uses it."""
    if intermediate not in ("crown", "ibp"):
        raise SafetylabError(f"intermediate must be 'crown' or 'ibp', got {intermediate!r}")
    layers, region, spec = _prepare(layers, region, spec)
    rows = _output_rows(spec)
    pre_activation, _ = activation_bounds(layers, region, intermediate)
    a_in, const = backward_pass(layers, rows, pre_activation)
    found = concretize(a_in, const, region)
    s = rows.shape[1] // 2
    return Bounds(found[:, :s], -found[:, s:], pre_activation, "crown" if intermediate == "crown" else "crown-ibp")


def alpha_crown(layers: list[Layer], region: Region, spec: torch.Tensor | None = None, iterations: int = 20,
                lr: float = 0.1) -> Bounds:
    """α-CROWN: the lower slopes of every unstable neuron, one per output row, optimised by Adam on the
    sum of the bounds and projected to ``[s, 1]``; the activations' input intervals are CROWN's. Each
    row keeps the best bound any iterate gave (the first iterate is CROWN)."""
    if iterations < 0 or not lr > 0:
        raise SafetylabError(f"iterations must be >= 0 and lr > 0, got {iterations} and {lr}")
    layers, region, spec = _prepare(layers, region, spec)
    rows = _output_rows(spec)
    with torch.no_grad():
        pre_activation, _ = activation_bounds(layers, region, "crown")
    activations = [layer for layer in layers if layer.is_activation]
    alphas = []
    for (lower, upper), layer in zip(pre_activation, activations):
        below, _, _ = relaxation(lower, upper, layer.op.slope)
        alphas.append(below.unsqueeze(1).expand(-1, rows.shape[1], *below.shape[1:]).clone().requires_grad_(True))
    optimizer = torch.optim.Adam(alphas, lr=lr) if alphas else None  # no activation: CROWN is exact
    best = None
    with torch.enable_grad():
        for step in range(iterations + 1):
            a_in, const = backward_pass(layers, rows, pre_activation, alphas)
            found = concretize(a_in, const, region)
            best = found.detach() if best is None else torch.maximum(best, found.detach())
            if step == iterations or optimizer is None:
                break
            optimizer.zero_grad()
            (-found.sum()).backward()
            optimizer.step()
            with torch.no_grad():
                for alpha, layer in zip(alphas, activations):
                    alpha.clamp_(layer.op.slope, 1.0)
    s = rows.shape[1] // 2
    return Bounds(best[:, :s], -best[:, s:], pre_activation, "alpha-crown")


def compute_bounds(model: nn.Module, region: Region, spec: torch.Tensor | None = None, method: str = "crown",
                   **options) -> Bounds:
    """Bounds of ``C f(x)`` (``f`` itself without ``spec``) over ``region`` by ``method`` (``"ibp"``,
    ``"crown"`` or ``"alpha-crown"``, whose ``iterations`` and ``lr`` may be given), in the widest dtype of
    the model's, the region's and the specification's."""
    if method not in METHODS:
        raise SafetylabError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = trace(model, check_region(region).input_shape)
    with torch.no_grad():
        if method == "ibp":
            return ibp(layers, region, spec)
        if method == "crown":
            return crown(layers, region, spec)
    return alpha_crown(layers, region, spec, **options)
