"""Models: the world's tokenizer and tiny LM, load/save, the one conversation encoder, sampling, log-probs and KL
for any HF causal LM."""

from safetylab.models.conversation import chat_template, encode_conversation, encode_responses, render_conversation
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
from safetylab.models.tokenizer import WORLD_CHAT_TEMPLATE, train_tokenizer

__all__ = [
    "WORLD_CHAT_TEMPLATE", "Batch", "ModelConfig", "Samples", "batch_logprobs", "build_model", "chat_template",
    "check_tokenizer", "encode_conversation", "encode_pairs", "encode_responses", "full_kl", "gather_logprobs",
    "kl_estimates", "kl_per_token", "load_model", "logprobs", "policy_kl", "render_conversation", "sample",
    "save_model", "train_tokenizer",
]
