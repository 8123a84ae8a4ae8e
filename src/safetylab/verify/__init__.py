"""Verification: sound bounds on a network's outputs over an input region (IBP, CROWN, α-CROWN),
complete verification of small ReLU networks (a MILP), randomized smoothing, and certified training.

- :mod:`.network`: a PyTorch network traced into the chain of layers bound propagation reads;
- :mod:`.regions`: input regions (L∞ and L2 balls, boxes) and output specifications;
- :mod:`.bounds`: IBP, CROWN (and CROWN-IBP), α-CROWN;
- :mod:`.exact`: exact verification with a checked counterexample, or "unknown" at a time limit;
- :mod:`.smoothing`: randomized smoothing's PREDICT and CERTIFY for any classifier;
- :mod:`.training`: IBP and CROWN-IBP training; :mod:`.suite`: the digits study.
"""

from safetylab.verify.bounds import Bounds, alpha_crown, compute_bounds, crown, ibp
from safetylab.verify.exact import ExactResult, minimize_output, verify_exact
from safetylab.verify.network import trace
from safetylab.verify.regions import Region, box, l2_ball, linf_ball, margin_spec
from safetylab.verify.smoothing import SmoothedClassifier, certified_accuracy_at
from safetylab.verify.training import CertifiedTrainConfig, certified_accuracy, train_certified

__all__ = [
    "Bounds", "CertifiedTrainConfig", "ExactResult", "Region", "SmoothedClassifier", "alpha_crown", "box",
    "certified_accuracy", "certified_accuracy_at", "compute_bounds", "crown", "ibp", "l2_ball", "linf_ball",
    "margin_spec", "minimize_output", "trace", "train_certified", "verify_exact",
]
