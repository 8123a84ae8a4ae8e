"""Sparse autoencoders on a model's activations: ReLU with an L1 penalty weighted by decoder norms, TopK
with AuxK, and JumpReLU; their losses, one training loop, metrics, and checkpoints that refuse the wrong
model.

An SAE writes an activation ``x`` (``d_in``) as a sparse, non-negative code ``f`` (``d_sae`` latents) times
a dictionary of directions (the decoder's rows) plus a bias. The three kinds differ in how ``f`` is made
sparse:

- ``relu`` (Anthropic, "Circuits Updates — April 2024"): ``f = ReLU(W_e x + b_e)``, ``x̂ = W_d f + b_d``,
  loss ``‖x − x̂‖² + λ Σ_i f_i ‖W_d,i‖``: the L1 penalty weighted by each decoder direction's norm, so the
  decoder is left free (no unit-norm constraint) and shrinking it cannot cheat the penalty. Decoder rows
  start as random directions of norm ``decoder_init_norm`` (0.1), ``W_e = W_dᵀ``, biases 0; λ rises
  linearly from 0 over the first 5 % of steps; no resampling.
- ``topk`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): ``f = ReLU(TopK_k(W_e (x −
  b_pre) + b_e))``, ``x̂ = W_d f + b_pre``, loss the normalised MSE plus AuxK: the residual ``e = x − x̂``
  reconstructed from the top ``aux_k`` *dead* latents alone (``ê = W_d z_aux``), weighted 1/32. A latent is
  dead when it has not fired for ``dead_steps`` batches. ``b_pre`` starts at the data **mean** (the paper
  uses the geometric median; on the data here the two differ little and the mean needs no iterations),
  ``W_e = W_dᵀ``, decoder rows kept unit-norm (the gradient's component parallel to each row removed
  before the step, rows renormalised after).
- ``jumprelu`` (Rajamanoharan et al. 2024, "Jumping Ahead"): ``f = z · H(z − θ)`` with ``z = W_e x + b_e``
  and a learned per-latent threshold ``θ = exp(log θ)``; loss ``‖x − x̂‖² + λ Σ_i H(z_i − θ_i)`` (L0
  directly), trained with straight-through pseudo-derivatives for θ through a rectangle kernel of
  bandwidth ε (:class:`JumpReLUFunction`, :class:`StepFunction`); decoder rows unit-norm as for TopK,
  ``W_e = W_dᵀ``, biases 0. θ and ε are in the units of the scaled input, where a unit encoder row gives
  pre-activations of order 1: θ starts at 1 and ε is 1 (the paper's 0.001 is for its own input scale).
  Two additions to the paper's loss, each its own coefficient (0 turns it off): AuxK on the dead latents as
  for TopK (``jumprelu_aux_coefficient``, default 1, on the unnormalised squared error, with latents dead
  after 5 batches without firing), and Anthropic's pre-activation term (``pre_act_coefficient``, default 0).
  Without AuxK, a fifth of the latents of the synthetic benchmark stop firing early (an encoder row that
  fires spuriously is pushed down by at least the threshold's height, and a latent that no longer fires
  gets no gradient) and recovery stalls at a mean best cosine of 0.82; with it, 0.998.

Every kind trains with Adam, gradients clipped to norm 1 and the learning rate decayed linearly to 0 over
the last 20 % of steps, on inputs scaled by one number so that ``E‖x‖² = d_in`` (Anthropic's convention;
the scale is a buffer, so a checkpoint carries it, and :meth:`SparseAutoencoder.forward` takes and returns
raw activations). Codes ``f`` are in the scaled units.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from safetylab.core.config import config_from_dict, config_to_dict, require, require_choice
from safetylab.core.errors import SafetylabError
from safetylab.core.io import read_json
from safetylab.interp.hooks import Hooks, check_signature

KINDS = ("relu", "topk", "jumprelu")
UNIT_NORM_DECODER = ("topk", "jumprelu")
# Learning rates where a config leaves lr unset, tuned on the synthetic benchmark (safetylab.interp.synthetic,
# 10,000 steps of 1,024): the papers' rates (5e-5, 2e-4 scaled by width, 7e-5) are for 10⁵+ steps.
DEFAULT_LR = {"relu": 1e-3, "topk": 1e-3, "jumprelu": 1e-3}
# Batches without firing after which a latent counts as dead (AuxK, the training log): Gao et al.'s window is
# 10M tokens (≈ 2,400 batches of 4,096); JumpReLU's AuxK needs a short one (see the module docstring).
DEFAULT_DEAD_STEPS = {"relu": 1000, "topk": 1000, "jumprelu": 5}
WEIGHTS = "sae.safetensors"
CONFIG = "sae.json"


@dataclass(frozen=True)
class SAEConfig:
    """One SAE and its training. ``d_sae`` None means ``expansion × d_in``; ``lr`` and ``dead_steps`` None the
    kind's default (:data:`DEFAULT_LR`, :data:`DEFAULT_DEAD_STEPS`); ``aux_k`` None a power of two near
    ``d_in / 2`` (Gao et al. 2024). The sparsity knobs (``l1_coefficient``, ``k``, ``l0_coefficient``) set
    the L0 and are the one thing to tune to the data."""

    kind: str = "topk"  # one of KINDS
    d_in: int = 128
    d_sae: int | None = None
    expansion: int = 8
    # relu
    l1_coefficient: float = 5.0  # λ on Σ f_i ‖W_d,i‖ (Anthropic's value, for inputs with E‖x‖² = d_in)
    decoder_init_norm: float = 0.1  # norm of the decoder rows at the start (relu; topk/jumprelu use 1)
    # topk
    k: int = 32
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_steps: int | None = None  # a latent that has not fired for this many batches is dead (AuxK, the log)
    # jumprelu
    l0_coefficient: float = 2.0  # λ on Σ H(z − θ)
    bandwidth: float = 1.0  # ε of the rectangle kernel, in the units of the scaled input
    threshold_init: float = 1.0  # θ at the start, same units
    pre_act_coefficient: float = 0.0  # λ_p of Anthropic's pre-activation term (0: the paper's loss alone)
    jumprelu_aux_coefficient: float = 1.0  # AuxK (Gao et al.) on the dead latents (0: the paper's loss alone)
    # training
    sparsity_warmup: float = 0.05  # share of steps over which λ (relu, jumprelu) rises linearly from 0
    lr: float | None = None
    lr_decay: float = 0.2  # share of steps, at the end, over which the learning rate falls linearly to 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    batch_size: int = 4096
    steps: int = 5000
    log_every: int = 100
    seed: int = 0

    def __post_init__(self):
        require_choice(self.kind, "kind", KINDS)
        for name in ("d_in", "expansion", "k", "batch_size", "steps", "log_every"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                    "an integer >= 1", value)
        for name in ("d_sae", "dead_steps"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), name,
                    "an integer >= 1 (or none: the default)", value)
        require(self.d_sae is None or (isinstance(self.d_sae, int) and self.d_sae >= 1), "d_sae",
                "an integer >= 1 (or none: expansion × d_in)", self.d_sae)
        require(self.kind != "topk" or self.k <= self.width, "k", f"at most d_sae ({self.width})", self.k)
        require(self.aux_k is None or (isinstance(self.aux_k, int) and 1 <= self.aux_k <= self.width), "aux_k",
                f"an integer in [1, d_sae = {self.width}] (or none: d_in / 2 rounded to a power of two)", self.aux_k)
        for name in ("l1_coefficient", "aux_coefficient", "l0_coefficient", "pre_act_coefficient",
                     "jumprelu_aux_coefficient"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), name, "a finite number >= 0", value)
        for name in ("decoder_init_norm", "bandwidth", "threshold_init", "grad_clip"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), name, "a finite number > 0", value)
        for name in ("sparsity_warmup", "lr_decay"):
            require(0 <= getattr(self, name) <= 1, name, "a share of the steps in [0, 1]", getattr(self, name))
        require(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "lr",
                "a finite number > 0 (or none: the kind's default)", self.lr)
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
                "two numbers in [0, 1)", self.adam_betas)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)

    @property
    def width(self) -> int:
        """The number of latents, ``d_sae``."""
        return self.d_sae if self.d_sae is not None else self.expansion * self.d_in

    @property
    def dead_window(self) -> int:
        return DEFAULT_DEAD_STEPS[self.kind] if self.dead_steps is None else self.dead_steps

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.kind] if self.lr is None else self.lr

    @property
    def auxk(self) -> int:
        """AuxK's k: the one given, else ``d_in / 2`` rounded to a power of two (at most ``d_sae``)."""
        default = 2 ** max(0, round(math.log2(max(self.d_in / 2, 1))))
        return min(self.aux_k or default, self.width)


# ============================================================================ the JumpReLU's pseudo-gradients
def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel ``K(u) = 1 if −½ < u < ½ else 0``."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``grad`` summed over the leading axes that broadcasting added (θ is per latent, z per token)."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class JumpReLUFunction(torch.autograd.Function):
    """``JumpReLU_θ(z) = z · H(z − θ)`` with the pseudo-derivatives of Rajamanoharan et al. (2024, eq. 11):

    - ``∂/∂z = H(z − θ)`` (the true derivative away from the jump);
    - ``∂/∂θ = −(θ / ε) · K((z − θ) / ε)``, K the :func:`rectangle` kernel of bandwidth ε: the jump's
      height θ spread over a window of width ε around it, so the reconstruction loss can move θ.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold).to(z.dtype)
        grad_theta = -(threshold / eps) * rectangle((z - threshold) / eps) * grad
        return grad_z, _sum_to(grad_theta, threshold.shape), None


class StepFunction(torch.autograd.Function):
    """The Heaviside step ``H(z − θ)`` with the pseudo-derivatives of Rajamanoharan et al. (2024, eq. 12):

    - ``∂/∂z = 0`` (the L0 penalty does not push the pre-activations);
    - ``∂/∂θ = −(1 / ε) · K((z − θ) / ε)``: raising θ switches off the latents within ε/2 of it.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad
        return torch.zeros_like(z), _sum_to(grad_theta, threshold.shape), None


# ============================================================================ losses (pure functions)
def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``E_x ‖x − x̂‖²``: summed over the features, averaged over the batch."""
    return (x - x_hat).pow(2).sum(-1).mean()


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over the batch: the error relative to predicting the batch mean (the
    fraction of variance unexplained; Gao et al. 2024's normalised MSE)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def relu_l1_loss(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, decoder_norms: torch.Tensor,
                 l1_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Anthropic (April 2024): ``L = E_x[‖x − x̂‖² + λ Σ_i f_i ‖W_d,i‖]``. Returns ``(L, sparsity term)``."""
    sparsity = (f * decoder_norms).sum(-1).mean()
    return squared_error(x, x_hat) + l1_coefficient * sparsity, sparsity


def topk_auxk_loss(x: torch.Tensor, x_hat: torch.Tensor, aux_hat: torch.Tensor | None,
                   aux_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gao et al. (2024): ``L = nmse(x, x̂) + α · nmse(e, ê)`` with ``e = x − x̂`` held fixed and ``ê`` its
    reconstruction from the top-k_aux dead latents (:func:`auxk_code`); no dead latents, no AuxK term.
    Returns ``(L, AuxK term)``."""
    if aux_hat is None:
        zero = x.new_zeros(())
        return normalized_mse(x, x_hat), zero
    aux = normalized_mse((x - x_hat).detach(), aux_hat)
    return normalized_mse(x, x_hat) + aux_coefficient * aux, aux


def jumprelu_loss(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, threshold: torch.Tensor,
                  l0_coefficient: float, bandwidth: float, pre_act_coefficient: float = 0.0,
                  decoder_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rajamanoharan et al. (2024): ``L = E_x[‖x − x̂‖² + λ Σ_i H(z_i − θ_i)]``, the step through
    :class:`StepFunction`; plus, when ``pre_act_coefficient`` λ_p > 0, Anthropic's pre-activation term
    (Circuits Updates, January 2025) ``λ_p E_x Σ_i ReLU(θ_i − z_i) ‖W_d,i‖`` (θ held fixed in it), which
    lifts the pre-activations of latents that do not fire, so a latent that has stopped firing everywhere
    (and so gets no other gradient) comes back. Returns ``(L, the L0 term)``."""
    l0 = StepFunction.apply(z, threshold, bandwidth).sum(-1).mean()
    loss = squared_error(x, x_hat) + l0_coefficient * l0
    if pre_act_coefficient > 0:
        below = (threshold.detach() - z).relu()
        below = below * decoder_norms if decoder_norms is not None else below
        loss = loss + pre_act_coefficient * below.sum(-1).mean()
    return loss, l0


def topk_code(z: torch.Tensor, k: int) -> torch.Tensor:
    """``ReLU(TopK_k(z))``: the k largest pre-activations of each row kept (negatives zeroed), the rest 0."""
    values, index = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, index, values.relu())


def auxk_code(z: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor | None:
    """AuxK's code: ``ReLU(TopK_{k_aux}(z))`` over the ``dead`` latents only (the others can neither be
    picked nor receive a gradient); None when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    return topk_code(z.masked_fill(~dead, float("-inf")), min(aux_k, n_dead)).nan_to_num(0.0)


def sparsity_factor(step: int, steps: int, warmup: float) -> float:
    """λ's share at ``step``: rising linearly from 0 to 1 over the first ``warmup`` share of the steps."""
    ramp = warmup * steps
    return 1.0 if ramp <= 0 else min(1.0, step / ramp)


def lr_factor(step: int, steps: int, decay: float) -> float:
    """The learning rate's share at ``step``: 1, then falling linearly to 0 over the last ``decay`` share."""
    start = (1 - decay) * steps
    return 1.0 if step < start else max(0.0, (steps - step) / (steps - start))


# ============================================================================ the model
class SparseAutoencoder(nn.Module):
    """An SAE of ``config.kind`` on raw activations of width ``config.d_in``. ``encode`` gives the code (in
    the scaled units), ``decode`` a raw activation, ``forward`` both: ``(x̂, f)``."""

    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d_in, d_sae = config.d_in, config.width
        direction = torch.randn(d_sae, d_in, generator=generator)
        norm = config.decoder_init_norm if config.kind == "relu" else 1.0
        decoder = direction / direction.norm(dim=1, keepdim=True) * norm
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if config.kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(config.threshold_init)))
        self.register_buffer("input_scale", torch.ones(()))

    # ----------------------------------------------------------------------- in the scaled units
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``z = W_e x + b_e`` (TopK: ``W_e (x − b_pre) + b_e``) of a scaled input. TopK's pre-encoder bias is
        folded into the encoder's, ``W_e x + (b_e − W_e b_pre)``: the same value, and its backward pass needs no
        full-size ``∂z · W_eᵀ`` product for ``b_pre`` (one matmul of six per step)."""
        if self.config.kind == "topk":
            return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)
        return x @ self.W_enc + self.b_enc

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        kind = self.config.kind
        if kind == "relu":
            return z.relu()
        if kind == "topk":
            return topk_code(z, self.config.k)
        return JumpReLUFunction.apply(z, self.threshold, self.config.bandwidth)

    def reconstruct(self, f: torch.Tensor) -> torch.Tensor:
        """``W_d f + b_d`` in the scaled units."""
        return f @ self.W_dec + self.b_dec

    # ----------------------------------------------------------------------- on raw activations
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(self._checked(x) * self.input_scale))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(f) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.d_in:
            raise SafetylabError(f"sparse autoencoder: input of shape {tuple(x.shape)}; expected (..., "
                                 f"{self.config.d_in}), the width it was trained on")
        return x.to(self.W_enc.dtype)

    # ----------------------------------------------------------------------- set-up from data
    @torch.no_grad()
    def fit_input_scale(self, x: torch.Tensor) -> float:
        """Set the input scale so that ``E‖s x‖² = d_in`` on ``x`` (and TopK's ``b_pre`` to the scaled mean)."""
        x = self._checked(x)
        scale = math.sqrt(self.config.d_in / x.pow(2).sum(-1).mean().clamp_min(1e-12).item())
        self.input_scale.fill_(scale)
        if self.config.kind == "topk":
            self.b_dec.copy_(x.mean(0) * scale)
        return scale

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows back to unit norm (TopK, JumpReLU), after an optimiser step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """``g_i ← g_i − (g_i · w_i) w_i`` for each unit decoder row ``w_i``: the step then moves the row
        along the unit sphere, not off it (Bricken et al. 2023; Gao et al. 2024)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)

    # ----------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
        """Weights (``sae.safetensors``) and config with ``meta`` (``sae.json``) in directory ``path``,
        written to a temporary directory and renamed into place. ``meta`` must hold ``model_signature``
        (:func:`~safetylab.interp.hooks.model_signature` of the LM) and ``hook`` (the hook point's name),
        so :func:`load_sae` can refuse another model or point."""
        missing = [key for key in ("model_signature", "hook") if key not in meta]
        if missing:
            raise SafetylabError(f"SparseAutoencoder.save: meta lacks {', '.join(missing)}; expected the LM's "
                                 "model_signature(model) and the hook point's name")
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS))
        record = {"config": config_to_dict(self.config), **dict(meta)}
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path


def load_sae(path: str | os.PathLike, hooks: Hooks | None = None, name: str | None = None,
             device: torch.device | str | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """``(sae, meta)`` saved by :meth:`SparseAutoencoder.save`. With ``hooks``, the checkpoint must be for
    hook point ``name`` (default: the one it was trained on), for that point's width on ``hooks.model``,
    and for that model (:func:`~safetylab.interp.hooks.check_signature`); each mismatch is an error."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise SafetylabError(f"{path}: not a sparse autoencoder checkpoint (expected {CONFIG} and {WEIGHTS})")
    record = read_json(path / CONFIG)
    config = config_from_dict(SAEConfig, record.pop("config", None), where=str(path / CONFIG))
    meta = record
    if hooks is not None:
        hook = meta.get("hook")
        name = hook if name is None else name
        hooks.check_name(name)
        if hook != name:
            raise SafetylabError(f"{path}: this SAE was trained on {hook!r}, not {name!r}; train one for {name!r} "
                                 "or load it at its own hook point")
        width = activation_width(hooks, name)
        if width != config.d_in:
            raise SafetylabError(f"{path}: this SAE reads activations of width {config.d_in}, but {name} of this "
                                 f"model has width {width}; expected a checkpoint trained on this model")
        check_signature(meta.get("model_signature", {}), hooks.model, f"the SAE at {path}")
    sae = SparseAutoencoder(config)
    try:
        state = load_file(str(path / WEIGHTS))
        sae.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - corrupt file or shapes that are not the config's
        raise SafetylabError(f"{path / WEIGHTS}: cannot load the weights for d_in {config.d_in}, d_sae "
                             f"{config.width} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if device is None and hooks is not None:
        device = next(hooks.model.parameters()).device
    return sae.to(device or "cpu").eval(), meta


def activation_width(hooks: Hooks, name: str) -> int:
    """The last dimension of the activation at ``name`` (one one-token forward pass, stopped early)."""
    device = next(hooks.model.parameters()).device
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    _, cache = hooks.run_with_cache(input_ids=ids, names=name, stop_early=True)
    act = cache[name]
    return int(act.shape[-1] * act.shape[-2]) if name.endswith("attn.z") else int(act.shape[-1])


# ============================================================================ training
@dataclass
class TrainState:
    """What a step needs beyond the batch: λ's warm-up share and the dead latents."""

    sparsity: float
    dead: torch.Tensor


def _relu_step(sae: SparseAutoencoder, x: torch.Tensor, state: TrainState):
    z = sae.pre_activations(x)
    f = z.relu()
    x_hat = sae.reconstruct(f)
    loss, _ = relu_l1_loss(x, x_hat, f, sae.W_dec.norm(dim=1), state.sparsity * sae.config.l1_coefficient)
    return loss, x_hat, f


def _topk_step(sae: SparseAutoencoder, x: torch.Tensor, state: TrainState):
    z = sae.pre_activations(x)
    f = topk_code(z, sae.config.k)
    x_hat = sae.reconstruct(f)
    aux = auxk_code(z, state.dead, sae.config.auxk)
    aux_hat = None if aux is None else aux @ sae.W_dec
    loss, _ = topk_auxk_loss(x, x_hat, aux_hat, sae.config.aux_coefficient)
    return loss, x_hat, f


def _jumprelu_step(sae: SparseAutoencoder, x: torch.Tensor, state: TrainState):
    z = sae.pre_activations(x)
    f = JumpReLUFunction.apply(z, sae.threshold, sae.config.bandwidth)
    x_hat = sae.reconstruct(f)
    loss, _ = jumprelu_loss(x, x_hat, z, sae.threshold, state.sparsity * sae.config.l0_coefficient,
                            sae.config.bandwidth, sae.config.pre_act_coefficient, sae.W_dec.norm(dim=1))
    if sae.config.jumprelu_aux_coefficient > 0:
        aux = auxk_code(z, state.dead, sae.config.auxk)
        if aux is not None:
            loss = loss + sae.config.jumprelu_aux_coefficient * squared_error((x - x_hat).detach(), aux @ sae.W_dec)
    return loss, x_hat, f


STEPS: dict[str, Callable[[SparseAutoencoder, torch.Tensor, TrainState], tuple]] = {
    "relu": _relu_step, "topk": _topk_step, "jumprelu": _jumprelu_step}


def train_sae(batches: Iterable[torch.Tensor] | torch.Tensor, config: SAEConfig,
              log: Callable[[dict[str, float]], None] | None = None) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE on ``batches`` (an iterator of ``(batch, d_in)`` raw activations, or one ``(n, d_in)``
    tensor drawn from in shuffled minibatches of ``config.batch_size``) for ``config.steps`` steps.

    The first batch sets the input scale (and TopK's ``b_pre``). Returns ``(sae, history)``; every
    ``log_every`` steps (and the last) ``history`` gets, and ``log`` is called with, ``step``, ``loss``,
    ``mse`` (``E‖x − x̂‖²`` in the scaled units, where ``E‖x‖² = d_in``), ``fvu``, ``l0``, ``dead``
    (share of latents not fired for ``config.dead_window`` batches) and ``lr``."""
    generator = torch.Generator().manual_seed(config.seed)
    stream = iter(_minibatches(batches, config.batch_size, generator) if isinstance(batches, torch.Tensor)
                  else batches)
    first = _next_batch(stream, 0, config)
    sae = SparseAutoencoder(config, generator).to(first.device)
    sae.fit_input_scale(first)
    unit_norm = config.kind in UNIT_NORM_DECODER
    if unit_norm:
        sae.normalize_decoder()
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.learning_rate, betas=config.adam_betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.steps, config.lr_decay))
    since_fired = torch.zeros(config.width, dtype=torch.long, device=first.device)
    history: list[dict] = []
    for step in range(config.steps):
        x = (first if step == 0 else _next_batch(stream, step, config)).to(sae.W_enc) * sae.input_scale
        state = TrainState(sparsity_factor(step, config.steps, config.sparsity_warmup),
                           since_fired >= config.dead_window)
        loss, x_hat, f = STEPS[config.kind](sae, x, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if unit_norm:
            sae.remove_parallel_gradient()
        nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        if unit_norm:
            sae.normalize_decoder()
        with torch.no_grad():
            fired = f.amax(0) > 0  # codes are never negative; 3× faster than (f > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                record = {"step": step + 1, "loss": loss.item(), "mse": squared_error(x, x_hat).item(),
                          "fvu": normalized_mse(x, x_hat).item(), "l0": (f > 0).sum(-1).float().mean().item(),
                          "dead": (since_fired >= config.dead_window).float().mean().item(),
                          "lr": optimizer.param_groups[0]["lr"]}
                history.append(record)
                if log is not None:
                    log(record)
    return sae.eval(), history


def _minibatches(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled minibatches of the rows of ``data``, epoch after epoch (the last partial batch dropped,
    unless the data is smaller than one batch)."""
    if data.ndim != 2 or data.shape[0] == 0:
        raise SafetylabError(f"train_sae: activations of shape {tuple(data.shape)}; expected (n, d_in) with n >= 1")
    size = min(batch_size, data.shape[0])
    while True:
        order = torch.randperm(data.shape[0], generator=generator).to(data.device)
        for start in range(0, data.shape[0] - size + 1, size):
            yield data[order[start:start + size]]


def _next_batch(stream: Iterator[torch.Tensor], step: int, config: SAEConfig) -> torch.Tensor:
    try:
        x = next(stream)
    except StopIteration:
        raise SafetylabError(f"train_sae: the batches ran out after {step} of {config.steps} steps; pass an "
                             "endless iterator (an ActivationStore) or a tensor") from None
    if x.ndim != 2 or x.shape[-1] != config.d_in:
        raise SafetylabError(f"train_sae: batch {step} has shape {tuple(x.shape)}; expected (batch, "
                             f"{config.d_in}) (config.d_in)")
    return x


# ============================================================================ metrics
@dataclass(frozen=True)
class SAEMetrics:
    """``l0`` (latents firing per token), ``explained_variance`` ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``, ``fvu``
    (``1 − explained_variance``), ``mse`` (``E‖x − x̂‖²`` on raw activations), and the shares of latents
    that are ``dead`` (never fired on these tokens) and ``dense`` (fired on more than ``dense_threshold``
    of them)."""

    l0: float
    explained_variance: float
    fvu: float
    mse: float
    dead: float
    dense: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@torch.no_grad()
def feature_density(sae: SparseAutoencoder, acts: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The share of the rows of ``acts`` (``(..., d_in)``) on which each latent fires: ``(d_sae,)``."""
    acts = acts.reshape(-1, acts.shape[-1])
    counts = sum((sae.encode(acts[i:i + batch_size].to(sae.W_enc.device)) > 0).sum(0).float().cpu()
                 for i in range(0, acts.shape[0], batch_size))
    return counts / max(acts.shape[0], 1)


@torch.no_grad()
def sae_metrics(sae: SparseAutoencoder, acts: torch.Tensor, dense_threshold: float = 0.1,
                batch_size: int = 4096) -> SAEMetrics:
    """:class:`SAEMetrics` of ``sae`` on raw activations ``acts`` (``(..., d_in)``, padding already left out)."""
    acts = acts.reshape(-1, acts.shape[-1]).float()
    if acts.shape[0] == 0:
        raise SafetylabError("sae_metrics: no activations given; expected at least one row")
    device = sae.W_enc.device
    error = l0 = 0.0
    fired = torch.zeros(sae.config.width)
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i:i + batch_size].to(device)
        x_hat, f = sae(x)
        error += (x - x_hat).pow(2).sum().item()
        l0 += (f > 0).sum().item()
        fired += (f > 0).sum(0).float().cpu()
    n = acts.shape[0]
    variance = (acts - acts.mean(0)).pow(2).sum().item()
    explained = 1.0 - error / max(variance, 1e-12)
    density = fired / n
    return SAEMetrics(l0=l0 / n, explained_variance=explained, fvu=1.0 - explained, mse=error / n,
                      dead=(density == 0).float().mean().item(),
                      dense=(density > dense_threshold).float().mean().item(), tokens=n)


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of an :class:`~safetylab.interp.data.Encoded` batch or a mapping."""
    if isinstance(batch, Mapping):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch.input_ids, getattr(batch, "attention_mask", None)
    return ids, torch.ones_like(ids) if mask is None else mask


def splice(sae: SparseAutoencoder, act: torch.Tensor) -> torch.Tensor:
    """``act`` replaced by the SAE's reconstruction, in its shape and dtype (``attn.z``'s heads flattened for
    the SAE and split again)."""
    flat = act.flatten(-2) if act.ndim == 4 else act
    return sae(flat)[0].to(act.dtype).view_as(act)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of −log p(token_{t+1} | ≤ t), count)`` over the positions whose next token is real: padding
    is neither predicted nor (with right padding) read."""
    targets = input_ids[:, 1:]
    keep = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    nll = nll.view_as(targets)
    return (nll * keep).sum(), keep.sum()


@torch.no_grad()
def ce_loss_recovered(hooks: Hooks, sae: SparseAutoencoder, name: str, batch_iter: Iterable[Any]
                      ) -> dict[str, float]:
    """The language model's next-token cross-entropy on ``batch_iter`` (``Encoded`` batches or mappings with
    ``input_ids`` and ``attention_mask``) clean (``ce_clean``), with the SAE's reconstruction spliced in at
    ``name`` (``ce_sae``) and with that activation zeroed (``ce_ablated``), averaged over real tokens; and
    ``recovered = (CE_ablated − CE_sae) / (CE_ablated − CE_clean)``: 1 when splicing in the SAE costs
    nothing, 0 when it is as bad as deleting the activation."""
    hooks.check_name(name)
    device = next(hooks.model.parameters()).device
    sae = sae.to(device)
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
        "clean": None, "sae": lambda act: splice(sae, act), "ablated": torch.zeros_like}
    totals = dict.fromkeys(runs, 0.0)
    count = 0
    for batch in batch_iter:
        ids, mask = (t.to(device) for t in _ids_and_mask(batch))
        for run, fn in runs.items():
            interventions = {} if fn is None else {name: fn}
            logits = hooks.run_with_interventions(interventions, input_ids=ids, attention_mask=mask).logits
            loss, n = next_token_loss(logits, ids, mask)
            totals[run] += loss.item()
        count += int(n)
    if count == 0:
        raise SafetylabError("ce_loss_recovered: no token with a real next token in the batches; expected rows of "
                             "two or more tokens")
    ce = {run: total / count for run, total in totals.items()}
    gap = ce["ablated"] - ce["clean"]
    recovered = (ce["ablated"] - ce["sae"]) / gap if abs(gap) > 1e-12 else float("nan")
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_ablated": ce["ablated"], "recovered": recovered,
            "tokens": count}
