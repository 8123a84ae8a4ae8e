"""Interpretability on any Hugging Face causal LM: hook points and caches, the logit lens, probes, sparse
autoencoders, steering and ablation, activation patching, and monitors made from them (docs/interp.md)."""

from safetylab.interp.hooks import Cache, HookPoint, Hooks, check_signature, model_signature
from safetylab.interp.lens import logit_lens, world_lens
from safetylab.interp.monitors import (
    FeatureMonitor,
    MonitorResult,
    ProbeMonitor,
    calibrate,
    load_monitor,
    monitor_report,
    save_monitor,
)
from safetylab.interp.patching import Patch, logit_difference, normalised_score, patch_by_position, patch_heads
from safetylab.interp.probes import Probe, fit_probe, load_probe, probe_by_layer, save_probe
from safetylab.interp.sae import SAEConfig, SparseAutoencoder, ce_loss_recovered, load_sae, sae_metrics, train_sae
from safetylab.interp.steering import (
    ablation_interventions,
    addition_interventions,
    difference_of_means,
    project_out,
)
from safetylab.interp.store import ActivationStore

__all__ = [
    "ActivationStore", "Cache", "FeatureMonitor", "HookPoint", "Hooks", "MonitorResult", "Patch", "Probe",
    "ProbeMonitor", "SAEConfig", "SparseAutoencoder", "ablation_interventions", "addition_interventions",
    "calibrate", "ce_loss_recovered", "check_signature", "difference_of_means", "fit_probe", "load_monitor",
    "load_probe", "load_sae", "logit_difference", "logit_lens", "model_signature", "monitor_report",
    "normalised_score", "patch_by_position", "patch_heads", "probe_by_layer", "project_out", "sae_metrics",
    "save_monitor", "save_probe", "train_sae", "world_lens",
]
