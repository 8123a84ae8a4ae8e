"""Models: the world's tokenizer and tiny LM, load/save, sampling, log-probs and KL for any HF causal LM."""

from safetylab.models.lm import ModelConfig, build_model, check_tokenizer, load_model, save_model
from safetylab.models.logprobs import (
    Batch,
    batch_logprobs,
    encode_pairs,
    full_kl,
    gather_logprobs,
    kl_estimates,
    kl_per_token,
    logprobs,
    policy_kl,
)
from safetylab.models.sampling import Samples, sample
from safetylab.models.tokenizer import train_tokenizer

__all__ = [
    "Batch", "ModelConfig", "Samples", "batch_logprobs", "build_model", "check_tokenizer", "encode_pairs",
    "full_kl", "gather_logprobs", "kl_estimates", "kl_per_token", "load_model", "logprobs", "policy_kl", "sample",
    "save_model", "train_tokenizer",
]
