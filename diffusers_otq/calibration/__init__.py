"""Calibration: statistics from the model's own sampling, output-aware fits and bit allocation.

It sits between model conversion (:mod:`diffusers_otq.convert`, :mod:`diffusers_otq.api`) and the pipelines: it
drives a full-precision pipeline, records each selected layer's input statistics with forward hooks
(:mod:`.sampling`, :mod:`.statistics`), fits codebooks to the layers' output error (:mod:`.fit`) and spends a
bits budget where it matters (:mod:`.allocation`); refinement (:mod:`.refine`) then trains the float parameters of
the quantized layers against the full-precision model's velocity, codes frozen. The math lives in :mod:`diffusers_otq.functional`
(``moments``, ``error_feedback``, ``allocation``); everything produces the ordinary packed format.
"""

from .allocation import BitsPlan, CandidateTable, LayerChoice, measure_candidates, plan_bits
from .api import calibrate, quantize_model, quantize_pipeline
from .config import CalibrationConfig, CalibrationError
from .probes import ProbeInputs
from .refine import RefineReport, TeacherCalls, refine_model
from .statistics import CalibrationStatistics, LayerStatistics


__all__ = [
    "BitsPlan",
    "CalibrationConfig",
    "CandidateTable",
    "CalibrationError",
    "CalibrationStatistics",
    "LayerChoice",
    "LayerStatistics",
    "ProbeInputs",
    "RefineReport",
    "TeacherCalls",
    "calibrate",
    "measure_candidates",
    "plan_bits",
    "quantize_model",
    "quantize_pipeline",
    "refine_model",
]
