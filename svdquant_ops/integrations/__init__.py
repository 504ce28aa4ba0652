"""Integrations: model-family knowledge (``diffusers``) and the explicit entry points (``api``)."""

from .api import QuantizeSummary, calibrate, quantize_model
from .diffusers import DEFAULT_RULES, prepare_model

__all__ = ["QuantizeSummary", "calibrate", "quantize_model", "prepare_model", "DEFAULT_RULES"]
