"""Interpretability on any Hugging Face causal LM: hook points and caches, the logit lens, probes, sparse
autoencoders, steering and ablation, activation patching, and monitors made from them."""

from safetylab.interp.hooks import Cache, HookPoint, Hooks, check_signature, model_signature

__all__ = ["Cache", "HookPoint", "Hooks", "check_signature", "model_signature"]
