"""Calibration: statistics from the model's own sampling, output-aware fits and bit allocation.

It sits between model conversion (:mod:`diffusers_otq.convert`, :mod:`diffusers_otq.api`) and the pipelines: it
drives a full-precision pipeline, records each selected layer's input statistics with forward hooks
(:mod:`.sampling`, :mod:`.statistics`), fits codebooks to the layers' output error (:mod:`.fit`) and spends a
bits budget where it matters (:mod:`.allocation`). The math lives in :mod:`diffusers_otq.functional`
(``moments``, ``error_feedback``, ``allocation``); everything produces the ordinary packed format.
"""

from .allocation import BitsPlan, LayerChoice, plan_bits
from .api import calibrate, quantize_model, quantize_pipeline
from .config import CalibrationConfig, CalibrationError
from .probes import ProbeInputs
from .statistics import CalibrationStatistics, LayerStatistics


__all__ = [
    "BitsPlan",
    "CalibrationConfig",
    "CalibrationError",
    "CalibrationStatistics",
    "LayerChoice",
    "LayerStatistics",
    "ProbeInputs",
    "calibrate",
    "plan_bits",
    "quantize_model",
    "quantize_pipeline",
]
