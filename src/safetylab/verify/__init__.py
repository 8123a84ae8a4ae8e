"""Verification: sound bounds on a network's outputs over an input region (IBP, CROWN, α-CROWN),
complete verification of small ReLU networks (a MILP), randomized smoothing, and certified training.

- :mod:`.network`: a PyTorch network traced into the chain of layers bound propagation reads;
- :mod:`.regions`: input regions (L∞ and L2 balls, boxes) and output specifications;
- :mod:`.bounds`: IBP, CROWN (and CROWN-IBP), α-CROWN;
- :mod:`.exact`: exact verification with a checked counterexample, or "unknown" at a time limit;
- :mod:`.smoothing`: randomized smoothing's PREDICT and CERTIFY for any classifier;
- :mod:`.training`: the IBP, CROWN-IBP and smoothing-noise losses for the one training loop of
  :mod:`safetylab.models.classifier`, and ``train_certified``;
- :mod:`.study`: the digits study as stages (``STAGES``, ``VerifyStudyConfig``, ``QUICK``,
  ``study_config``) that ``safetylab verify`` and the audit run.
"""

from safetylab.models.classifier import ClassifierTrainConfig
from safetylab.verify.bounds import Bounds, alpha_crown, compute_bounds, crown, ibp
from safetylab.verify.exact import ExactResult, minimize_output, verify_exact
from safetylab.verify.network import trace
from safetylab.verify.regions import Region, box, l2_ball, linf_ball, margin_spec
from safetylab.verify.smoothing import SmoothedClassifier, certified_accuracy_at
from safetylab.verify.training import (
    certified_accuracy,
    certified_config,
    crown_ibp_loss,
    ibp_loss,
    noise_loss,
    train_certified,
)

__all__ = [
    "Bounds", "ClassifierTrainConfig", "ExactResult", "Region", "SmoothedClassifier", "alpha_crown", "box",
    "certified_accuracy", "certified_accuracy_at", "certified_config", "compute_bounds", "crown", "crown_ibp_loss",
    "ibp", "ibp_loss", "l2_ball", "linf_ball", "margin_spec", "minimize_output", "noise_loss", "trace",
    "train_certified", "verify_exact",
]
