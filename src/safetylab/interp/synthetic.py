"""A ground-truth benchmark for sparse autoencoders: data made of known sparse features, and how well an
SAE's decoder finds them.

Each sample is ``x = Σ_i a_i d_i + n``: ``n_features`` random unit directions ``d_i`` in ``R^d`` (1,024 in
128 dimensions: eight times more features than dimensions, so they sit in superposition), each active
independently with probability ``p`` (0.01, about 10 active per sample) with a magnitude ``a_i`` drawn
uniformly from ``[0, 1]`` (as in Sharkey et al. 2022, "Taking features out of superposition with sparse
autoencoders"), plus Gaussian noise ``n ~ N(0, σ² I)`` with σ = 0.01. Recovery is the mean, over the true
directions, of the best cosine with any decoder row (Sharkey et al.'s mean max cosine similarity), signed:
a row pointing against a feature whose magnitudes are positive has not found it.

Measured with :func:`benchmark_config` and :func:`run_benchmark` (1,024 latents, 10,000 steps of 1,024
samples, seed 0; one CPU thread, 9–18 minutes each on a shared machine):

========  ================  ==============  =====  =====
kind      mean best cosine  L0 (true 10.2)  FVU    dead
========  ================  ==============  =====  =====
relu      0.988             12.5            0.25   0
topk      0.996             15.7            0.16   0
jumprelu  0.998             6.1             0.22   0.001
========  ================  ==============  =====  =====
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from safetylab.core.config import require
from safetylab.core.errors import SafetylabError
from safetylab.core.seeding import derive_seed
from safetylab.interp.sae import SAEConfig, SparseAutoencoder, sae_metrics, train_sae


@dataclass(frozen=True)
class SyntheticConfig:
    n_features: int = 1024
    d: int = 128
    p: float = 0.01  # each feature's probability of being active in a sample
    noise: float = 0.01  # σ of the Gaussian noise per coordinate
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "d"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(0 < self.p <= 1, "p", "a probability in (0, 1]", self.p)
        require(self.noise >= 0, "noise", "a number >= 0", self.noise)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)


class SyntheticFeatures:
    """The benchmark's true directions (``directions``, ``(n_features, d)``, unit rows) and samples of it."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig()):
        self.config = config
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "synthetic", "directions"))
        directions = torch.randn(config.n_features, config.d, generator=generator)
        self.directions = directions / directions.norm(dim=1, keepdim=True)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, a)``: ``n`` samples ``(n, d)`` and their true feature magnitudes ``(n, n_features)``.
        One uniform draw ``u`` per (sample, feature) gives both: the feature is active when ``u < p``, and
        then ``u / p`` is uniform on ``[0, 1)``."""
        u = torch.rand(n, self.config.n_features, generator=generator)
        a = torch.where(u < self.config.p, u / self.config.p, torch.zeros_like(u))
        x = a @ self.directions
        if self.config.noise > 0:
            x = x + self.config.noise * torch.randn(n, self.config.d, generator=generator)
        return x, a

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """An endless stream of ``(batch_size, d)`` samples (fresh data every batch)."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "synthetic", "samples", seed))
        while True:
            yield self.sample(batch_size, generator)[0]


def mean_best_cosine(true_directions: torch.Tensor, decoder: torch.Tensor, signed: bool = True) -> float:
    """``mean_i max_j cos(d_i, w_j)`` over the true directions ``d_i`` (rows of ``true_directions``) and the
    decoder rows ``w_j`` (``decoder`` is ``(d_sae, d)``, as :class:`SparseAutoencoder` stores it); with
    ``signed=False``, ``|cos|``. 1 when every true direction has a decoder row pointing exactly along it."""
    if true_directions.shape[-1] != decoder.shape[-1]:
        raise SafetylabError(f"mean_best_cosine: true directions of width {true_directions.shape[-1]} against a "
                             f"decoder of width {decoder.shape[-1]}; expected the same width")
    a = true_directions / true_directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = a.float() @ b.float().t()
    return (cos if signed else cos.abs()).max(dim=1).values.mean().item()


# The step budget of the benchmark: SAELens's train_toy_sae default (10M samples at batch 1,024), ≈ 10,000 steps.
BENCHMARK_STEPS, BENCHMARK_BATCH = 10_000, 1024
# Each kind's sparsity knob for this data (about 10 features active per sample): the one setting a user tunes
# to their data; the rest are SAEConfig's defaults.
BENCHMARK_SPARSITY = {"relu": {"l1_coefficient": 2.0}, "topk": {"k": 16}, "jumprelu": {"l0_coefficient": 2.0}}


def benchmark_config(kind: str, data: SyntheticConfig = SyntheticConfig(), **overrides) -> SAEConfig:
    """The benchmark's SAE of ``kind``: 8 latents per dimension (1,024 for d = 128), the step budget
    :data:`BENCHMARK_STEPS` × :data:`BENCHMARK_BATCH`, the kind's :data:`BENCHMARK_SPARSITY`."""
    settings = {"kind": kind, "d_in": data.d, "expansion": 8, "steps": BENCHMARK_STEPS,
                "batch_size": BENCHMARK_BATCH, **BENCHMARK_SPARSITY.get(kind, {}), **overrides}
    return SAEConfig(**settings)


def run_benchmark(config: SAEConfig, data: SyntheticConfig = SyntheticConfig(), eval_samples: int = 65_536,
                  log=None) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train an SAE of ``config`` on fresh synthetic batches for ``config.steps`` steps and measure it:
    ``mean_best_cosine`` (signed and ``|cos|``), ``l0``, ``fvu``, ``dead``, the true L0 and the seconds taken."""
    if config.d_in != data.d:
        raise SafetylabError(f"run_benchmark: the SAE's d_in is {config.d_in} but the data has d = {data.d}")
    features = SyntheticFeatures(data)
    start = time.perf_counter()
    sae, history = train_sae(features.batches(config.batch_size, config.seed), config, log=log)
    seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(derive_seed(data.seed, "synthetic", "evaluation"))
    x, a = features.sample(eval_samples, generator)
    metrics = sae_metrics(sae, x)
    return sae, {"kind": config.kind, "steps": config.steps, "batch_size": config.batch_size,
                 "d_sae": config.width, "mean_best_cosine": mean_best_cosine(features.directions, sae.W_dec),
                 "mean_best_abs_cosine": mean_best_cosine(features.directions, sae.W_dec, signed=False),
                 "l0": metrics.l0, "true_l0": (a > 0).sum(-1).float().mean().item(), "fvu": metrics.fvu,
                 "dead": metrics.dead, "seconds": seconds}
