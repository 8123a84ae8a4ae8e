"""Deprecated: the digits and their classifiers moved to :mod:`safetylab.models.digits` and
:mod:`safetylab.models.classifier`, below both :mod:`safetylab.robust` and :mod:`safetylab.verify`.
This module re-exports them for code written before the move; import them from there."""

from safetylab.models.classifier import (
           ARCHS,
           build_classifier,
           digits_cnn,
           digits_mlp,
           load_classifier,
           save_classifier,
)
from safetylab.models.digits import Digits, load_digits

__all__ = ["ARCHS", "Digits", "build_classifier", "digits_cnn", "digits_mlp", "load_classifier", "load_digits",
           "save_classifier"]
