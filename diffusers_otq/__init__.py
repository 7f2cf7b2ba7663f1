"""diffusers-otq: optimal-transport codebook quantization (2-8 bits per weight) for flow-matching models.

Importing the package registers the ``"otq"`` quantization backend with diffusers and transformers, which is
what lets ``from_pretrained`` load OTQ checkpoints:

>>> import torch
>>> from diffusers_otq import OTQConfig, quantize_tensor
>>> q = quantize_tensor(torch.randn(256, 512), bits=3, method="ot", granularity="channel")
>>> w_hat = q.dequantize()
>>> OTQConfig(bits=3).quant_method.value
'otq'
"""

from . import _quiet_imports  # noqa: F401  (first: imports diffusers without the optional backends' noise)
from .calibration import (
    BitsPlan,
    CalibrationConfig,
    CalibrationError,
    CalibrationStatistics,
    calibrate,
    plan_bits,
    quantize_model,
    quantize_pipeline,
)
from .config import FORMAT_VERSION, OTQConfig
from .convert import LayerReport, dequantize_model
from .functional.metrics import relative_mse, wasserstein2
from .hub import push_to_hub
from .layers import OTQConv2d, OTQLinear
from .options import GRANULARITIES, METHODS, LayerSpec
from .pipeline import FlowMatchPipeline
from .quantized_tensor import QuantizedTensor, quantize_tensor
from .quantizer import OTQQuantizer
from .reference import reference_models
from .registration import register


register()

__version__ = "0.1.0"

__all__ = [
    "BitsPlan",
    "CalibrationConfig",
    "CalibrationError",
    "CalibrationStatistics",
    "FORMAT_VERSION",
    "FlowMatchPipeline",
    "GRANULARITIES",
    "LayerReport",
    "LayerSpec",
    "METHODS",
    "OTQConfig",
    "OTQConv2d",
    "OTQLinear",
    "OTQQuantizer",
    "QuantizedTensor",
    "calibrate",
    "dequantize_model",
    "plan_bits",
    "push_to_hub",
    "quantize_model",
    "quantize_pipeline",
    "quantize_tensor",
    "reference_models",
    "register",
    "relative_mse",
    "wasserstein2",
]
