"""Robustness of any ``nn.Module`` classifier: will it hold under attack and shift, does it know when it
does not know, and what does the system do then?

Inputs lie in a stated range (``bounds``, [0, 1] by default; normalisation lives inside the model) and
the model returns logits ``(N, classes)``. Every score of doubt — OOD detectors, uncertainty, abstention
criteria — follows **one sign convention: higher = more anomalous**.

- :mod:`.attacks`: FGSM, PGD (L∞/L2, restarts, targeted), APGD (CE, DLR), Square (black box);
- :mod:`.evaluate`: ``evaluate_robustness`` (an AutoAttack-style ensemble on the still-robust points),
  gradient-masking checks, robust accuracy against ε;
- :mod:`.training`: the PGD and TRADES losses, and ``train_classifier`` (standard, PGD, TRADES) on the
  one training loop of :mod:`safetylab.models.classifier`;
- :mod:`.uncertainty` and :mod:`.calibration`: MC dropout, deep ensembles, the entropy split into
  aleatoric and epistemic parts, ECE, NLL, Brier, temperature scaling, reliability diagrams;
- :mod:`.ood`: MSP, ODIN, energy, Mahalanobis, KNN and ensemble/MC-dropout detectors; AUROC, AUPR-In,
  AUPR-Out, FPR@95%TPR;
- :mod:`.shift`: image corruptions and feature-vector perturbations at five severities, the shift report;
- :mod:`.selective`: risk–coverage, AURC, thresholds for a target coverage or risk, and the abstaining
  classifier whose abstentions carry their reasons;
- :mod:`.study`: the digits study as stages (``STAGES``, ``RobustStudyConfig``, ``QUICK``, ``study_config``)
  that ``safetylab robust`` and the audit run; the digits and their classifiers live in
  :mod:`safetylab.models.digits` and :mod:`safetylab.models.classifier` (re-exported here), the tensor
  checks in :mod:`safetylab.core.tensors`.
"""

from safetylab.models.classifier import (
    ClassifierTrainConfig,
    digits_cnn,
    digits_mlp,
    load_classifier,
    save_classifier,
)
from safetylab.models.digits import load_digits
from safetylab.robust.attacks import apgd, dlr_loss, fgsm, pgd, square
from safetylab.robust.calibration import (
    TemperatureScaled,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from safetylab.robust.evaluate import RobustnessResult, evaluate_robustness, gradient_masking, robustness_curve
from safetylab.robust.ood import (
    DETECTORS,
    KNN,
    MSP,
    ODIN,
    Detector,
    Energy,
    Mahalanobis,
    Uncertainty,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
)
from safetylab.robust.selective import (
    Criterion,
    SelectiveClassifier,
    aurc,
    risk_coverage,
    threshold_for_coverage,
    threshold_for_risk,
)
from safetylab.robust.shift import FEATURE_SHIFTS, IMAGE_SHIFTS, shift_report, synthetic_ood
from safetylab.robust.training import pgd_loss, trades_loss, train_classifier
from safetylab.robust.uncertainty import (
    ensemble_probs,
    mc_dropout_probs,
    train_ensemble,
    uncertainty_split,
)

__all__ = [
    "ClassifierTrainConfig", "Criterion", "DETECTORS", "Detector", "Energy", "FEATURE_SHIFTS", "IMAGE_SHIFTS",
    "KNN", "MSP", "Mahalanobis", "ODIN", "RobustnessResult", "SelectiveClassifier",
    "TemperatureScaled", "Uncertainty", "apgd", "aupr_in", "aupr_out", "aurc", "auroc", "brier_score",
    "calibration_metrics", "digits_cnn", "digits_mlp", "dlr_loss", "ensemble_probs", "evaluate_robustness",
    "expected_calibration_error", "fgsm", "fit_temperature", "fpr_at_tpr", "gradient_masking", "load_classifier",
    "load_digits", "mc_dropout_probs", "negative_log_likelihood", "ood_metrics", "pgd", "pgd_loss",
    "reliability_bins", "risk_coverage", "robustness_curve", "save_classifier", "shift_report", "square",
    "synthetic_ood", "threshold_for_coverage", "threshold_for_risk", "trades_loss", "train_classifier",
    "train_ensemble", "uncertainty_split",
]
