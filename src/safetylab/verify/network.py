"""A PyTorch network as the chain of operations that bound propagation reads: affine maps and
piecewise-linear activations.

Every supported layer is one of two kinds. An *affine* operation ``y = W x + b`` (Linear, Conv2d,
BatchNorm in eval mode, AvgPool2d, Flatten) offers the four things bound propagation needs: ``forward``
(``W x + b``), ``forward_abs`` (``|W| r``, for interval radii), ``backward`` (``A W``, moving a linear
bound from its output to its input) and ``bias_term`` (``A b``). An *activation* (ReLU, LeakyReLU) is
``max(x, slope · x)``. Dropout and Identity are the identity in eval mode and are skipped.

The network is traced with ``torch.fx``, so nested ``nn.Sequential`` models and custom modules whose
``forward`` is a chain of supported calls both work; a branch (a residual addition) or any other layer is
refused with its name and place in the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from safetylab.core.errors import SafetylabError
from safetylab.core.tensors import check_eval, model_device, model_dtype

SUPPORTED = "Linear, Conv2d, ReLU, LeakyReLU, Flatten, BatchNorm1d/2d (eval), AvgPool2d, Dropout, Identity"


@dataclass(frozen=True)
class LinearOp:
    """``y = W x + b`` for a Linear layer."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return F.linear(r, self.weight.abs())

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.weight

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.bias


@dataclass(frozen=True)
class ConvOp:
    """A 2-D convolution (and average pooling, a convolution with a constant kernel per channel)."""

    weight: torch.Tensor  # (out_channels, in_channels / groups, kh, kw)
    bias: torch.Tensor  # (out_channels,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return F.conv2d(r, self.weight.abs(), None, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, a: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        """``A W`` by the transposed convolution; ``output_padding`` restores the input size that a
        stride rounded away."""
        lead, out_shape = a.shape[:-3], a.shape[-3:]
        kernel = self.weight.shape[2:]
        size = [(o - 1) * s - 2 * p + d * (k - 1) + 1
                for o, s, p, d, k in zip(out_shape[1:], self.stride, self.padding, self.dilation, kernel)]
        extra = tuple(i - s for i, s in zip(in_shape[1:], size))
        x = F.conv_transpose2d(a.reshape(-1, *out_shape), self.weight, None, self.stride, self.padding, extra,
                               self.groups, self.dilation)
        return x.reshape(*lead, *in_shape)

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        return a.sum((-2, -1)) @ self.bias


@dataclass(frozen=True)
class ScaleOp:
    """``y = s ⊙ x + t`` per channel (BatchNorm in eval mode), channels on dimension 1 of the input."""

    scale: torch.Tensor  # (channels,)
    shift: torch.Tensor  # (channels,)

    def _per_channel(self, v: torch.Tensor, dims: int) -> torch.Tensor:
        return v.reshape(-1, *([1] * (dims - 1)))  # broadcast over a (C, ...) example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._per_channel(self.scale, x.dim() - 1) + self._per_channel(self.shift, x.dim() - 1)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return r * self._per_channel(self.scale.abs(), r.dim() - 1)

    def backward(self, a: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        return a * self._per_channel(self.scale, len(in_shape))

    def bias_term(self, a: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        return (a * self._per_channel(self.shift, len(in_shape))).flatten(-len(in_shape)).sum(-1)


@dataclass(frozen=True)
class FlattenOp:
    """Flatten every dimension but the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    forward_abs = forward


@dataclass(frozen=True)
class Activation:
    """``max(x, slope · x)``: ReLU (slope 0) or LeakyReLU (0 < slope < 1)."""

    slope: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.slope * x)


Op = LinearOp | ConvOp | ScaleOp | FlattenOp | Activation


@dataclass(frozen=True)
class Layer:
    """One operation of the chain, with where it came from and its per-example input and output shapes."""

    op: Op
    name: str  # the module's qualified name (or the traced call), for messages
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    matrix: torch.Tensor | None = None  # a small convolution as its dense (out, in) matrix: one matmul back

    @property
    def is_activation(self) -> bool:
        return isinstance(self.op, Activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.forward(x)

    def forward_abs(self, r: torch.Tensor) -> torch.Tensor:
        return self.op.forward_abs(r)

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        """A linear bound's coefficients ``A`` on this layer's output, ``(..., *out_shape)``, as
        coefficients on its input, ``(..., *in_shape)``."""
        if isinstance(self.op, LinearOp):
            return self.op.backward(a)
        if self.matrix is not None:
            return (a.flatten(-len(self.out_shape)) @ self.matrix).reshape(*a.shape[:-len(self.out_shape)],
                                                                          *self.in_shape)
        if isinstance(self.op, FlattenOp):
            return a.reshape(*a.shape[:-1], *self.in_shape)
        return self.op.backward(a, self.in_shape)

    def unit_rows(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``e_i W`` and ``e_i · b`` for the flat output neurons ``index`` (any shape): the rows of this
        affine layer's matrix and bias — taken directly where the matrix is at hand, which is what a
        backward pass from unit rows would compute."""
        matrix = self.op.weight if isinstance(self.op, LinearOp) else self.matrix
        if matrix is not None:
            bias = self.op.bias.repeat_interleave(matrix.shape[0] // len(self.op.bias))  # per output position
            return matrix[index].reshape(*index.shape, *self.in_shape), bias[index]
        eye = torch.zeros(*index.shape, math.prod(self.out_shape), dtype=dtype, device=index.device)
        a = eye.scatter_(-1, index.unsqueeze(-1), 1.0).reshape(*index.shape, *self.out_shape)
        return self.backward(a), self.bias_term(a)

    def bias_term(self, a: torch.Tensor) -> torch.Tensor:
        """``A b``: the constant this layer adds to a linear bound with coefficients ``A``."""
        if isinstance(self.op, (LinearOp, ConvOp)):
            return self.op.bias_term(a)
        if isinstance(self.op, ScaleOp):
            return self.op.bias_term(a, self.out_shape)
        return a.new_zeros(a.shape[:-len(self.out_shape)])


def _op_of(module: nn.Module, name: str) -> Op | None:
    """The operation of a supported module (None for the identity in eval mode); raises for any other."""
    if isinstance(module, nn.Linear):
        bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_features)
        return LinearOp(module.weight, bias)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise SafetylabError(f"layer {name!r} (Conv2d): only numeric zero padding is supported, "
                                 f"got padding={module.padding!r}, padding_mode={module.padding_mode!r}")
        bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
        return ConvOp(module.weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.running_mean is None:
            raise SafetylabError(f"layer {name!r} ({type(module).__name__}) keeps no running statistics "
                                 "(track_running_stats=False): it has no fixed affine map to verify")
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale + (module.bias if module.bias is not None else 0.0)
        return ScaleOp(scale, shift)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise SafetylabError(f"layer {name!r} (Flatten): only Flatten(start_dim=1, end_dim=-1) is supported")
        return FlattenOp()
    if isinstance(module, nn.ReLU):
        return Activation(0.0)
    if isinstance(module, nn.LeakyReLU):
        return _leaky(module.negative_slope, name)
    raise SafetylabError(f"layer {name!r} ({type(module).__name__}) is not supported; supported: {SUPPORTED}")


def _leaky(slope: float, name: str) -> Activation:
    if not 0.0 <= slope < 1.0:
        raise SafetylabError(f"layer {name!r} (LeakyReLU): negative_slope must be in [0, 1), got {slope}")
    return Activation(float(slope))


def _avg_pool(module: nn.AvgPool2d, name: str, channels: int, like: torch.Tensor) -> ConvOp:
    """Average pooling as a depthwise convolution with the constant kernel 1 / (kh · kw)."""
    kernel = nn.modules.utils._pair(module.kernel_size)
    if module.ceil_mode or module.divisor_override is not None or not module.count_include_pad:
        raise SafetylabError(f"layer {name!r} (AvgPool2d): only ceil_mode=False, count_include_pad=True and no "
                             "divisor_override are supported")
    weight = like.new_full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
    stride = nn.modules.utils._pair(module.stride or module.kernel_size)
    return ConvOp(weight, like.new_zeros(channels), stride, nn.modules.utils._pair(module.padding), (1, 1), channels)


_IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def trace(model: nn.Module, input_shape: tuple[int, ...], detach: bool = True) -> list[Layer]:
    """The model as a chain of :class:`Layer` for inputs of per-example shape ``input_shape``.

    The model and every submodule must be in eval mode (training-mode BatchNorm and Dropout are not fixed
    functions), a chain (each operation takes the one before it as its only input) and built from
    supported layers; anything else is refused with the layer's name, as is a layer that cannot take
    inputs of ``input_shape``. The layers are in the model's dtype; a model without a floating-point
    parameter or buffer is traced in float64, so that no constant (average pooling's ``1 / (kh · kw)``)
    is rounded. With ``detach=False`` the layers hold the module's own tensors, so a loss on the bounds
    trains the parameters (certified training traces anew each step)."""
    if not isinstance(model, nn.Module):
        raise SafetylabError(f"model must be an nn.Module, got {type(model).__name__}")
    check_eval(model, "model", "verifying it")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001  (fx raises many types for untraceable code)
        raise SafetylabError(f"the model could not be traced as a chain of layers ({type(e).__name__}: {e}); "
                             f"write it as an nn.Sequential of: {SUPPORTED}") from None
    modules = dict(model.named_modules())
    probe = torch.zeros(1, *input_shape, dtype=model_dtype(model) or torch.float64, device=model_device(model))
    layers: list[Layer] = []
    previous = None
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "output":
                break
            if node.op != "placeholder":
                if node.all_input_nodes != [previous]:
                    raise SafetylabError(f"the network is not a chain at {node.name!r}: residual additions and "
                                         "other branches are not supported")
                op = _node_op(node, modules, probe)
                if op is not None:
                    op = map_tensors(op, torch.Tensor.detach) if detach else op
                    try:
                        out = op.forward(probe)
                    except RuntimeError as e:
                        where = (f"layer {node.target!r} ({type(modules[node.target]).__name__})"
                                 if node.op == "call_module" else f"operation {node.name!r}")
                        raise SafetylabError(f"{where} cannot take inputs of shape {tuple(probe.shape[1:])} (the "
                                             f"network's input has shape {tuple(input_shape)}): {e}") from None
                    layers.append(Layer(op, str(node.target), tuple(probe.shape[1:]), tuple(out.shape[1:]),
                                        _dense(op, probe[0].numel(), out[0].numel(), tuple(probe.shape[1:]))))
                    probe = out
            previous = node
    if not layers:
        raise SafetylabError("the model holds no layer to verify")
    return layers


def _dense(op: Op, n_in: int, n_out: int, in_shape: tuple[int, ...], limit: int = 1 << 22) -> torch.Tensor | None:
    """A convolution's matrix ``(out, in)`` when it has at most ``limit`` entries: on small images one
    matrix product moves a bound back faster than a transposed convolution."""
    if not isinstance(op, ConvOp) or n_in * n_out > limit:
        return None
    basis = torch.eye(n_in, dtype=op.weight.dtype, device=op.weight.device).reshape(n_in, *in_shape)
    return (op.forward(basis) - op.forward(torch.zeros_like(basis[:1]))).reshape(n_in, n_out).T.contiguous()


def check_layers(layers: object) -> list[Layer]:
    """``layers`` must be a non-empty chain from :func:`trace` whose output is a vector of scores per example."""
    if not isinstance(layers, list) or not layers or not all(isinstance(layer, Layer) for layer in layers):
        raise SafetylabError("layers must be a non-empty list of Layer (from safetylab.verify.network.trace)")
    if len(layers[-1].out_shape) != 1:
        raise SafetylabError(f"the network's output must be a vector of scores per example, "
                             f"got shape {layers[-1].out_shape}")
    return layers


def map_tensors(item, fn):
    """A copy of a frozen dataclass (an operation, a :class:`Layer` with its operation, or a region) with
    ``fn`` applied to each of its tensors: cut from autograd, or cast to another dtype."""
    fields = {k: fn(v) if isinstance(v, torch.Tensor) else map_tensors(v, fn) if k == "op" else v
              for k, v in vars(item).items()}
    return type(item)(**fields)


def _node_op(node: fx.Node, modules: dict[str, nn.Module], probe: torch.Tensor) -> Op | None:
    """The operation of one traced call."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, _IDENTITIES):
            return None
        if isinstance(module, nn.AvgPool2d):
            return _avg_pool(module, node.target, probe.shape[1], probe)
        return _op_of(module, node.target)
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return Activation(0.0)
    if node.op == "call_function" and node.target is F.leaky_relu:
        return _leaky(node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01), node.name)
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if (start, end) != (1, -1):
            raise SafetylabError(f"flatten at {node.name!r} must be flatten(x, 1) (keep the batch dimension)")
        return FlattenOp()
    raise SafetylabError(f"operation {node.target!r} at {node.name!r} is not supported; supported: {SUPPORTED}")
