"""diffusers-otq: optimal-transport codebook quantization (2-8 bits per weight) for flow-matching models.

>>> import torch
>>> from diffusers_otq import quantize_tensor
>>> q = quantize_tensor(torch.randn(256, 512), bits=3, method="ot", granularity="channel")
>>> w_hat = q.dequantize()
"""

from .convert import dequantize_model, quantize_model
from .functional.metrics import relative_mse, wasserstein2
from .layers import OTQConv2d, OTQLinear
from .options import GRANULARITIES, METHODS
from .quantized_tensor import QuantizedTensor, quantize_tensor


__version__ = "0.1.0"

__all__ = [
    "GRANULARITIES",
    "METHODS",
    "OTQConv2d",
    "OTQLinear",
    "QuantizedTensor",
    "dequantize_model",
    "quantize_model",
    "quantize_tensor",
    "relative_mse",
    "wasserstein2",
]
