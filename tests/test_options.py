"""Shared option helpers: the setting labels that bits plans and evaluation reports print."""

from __future__ import annotations

import torch

from diffusers_otq.calibration.allocation import LayerChoice
from diffusers_otq.options import LayerSpec, setting_label
from diffusers_otq.quantized_tensor import quantize_tensor


def test_setting_labels_name_bits_granularity_group_dimension_and_int8() -> None:
    assert setting_label(3, "channel") == "3-bit channel"
    assert setting_label(2, "group", 64) == "2-bit group 64"
    assert setting_label(2, "tensor", None, 4, torch.int8) == "2-bit tensor 4-D int8"
    assert setting_label(2, "tensor", None, 4, torch.float16) == "2-bit tensor 4-D"


def test_a_plans_label_and_the_stored_layers_label_agree() -> None:
    spec = LayerSpec(bits=2, granularity="tensor", vector_dim=4, codebook_dtype=torch.int8)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    stored = quantize_tensor(weight, 2, granularity="tensor", vector_dim=4, codebook_dtype=torch.int8)
    choice = LayerChoice("layer", spec, weight.numel(), stored.nbytes, relative_error=0.0, distortion=0.0)
    stored_label = setting_label(
        stored.bits, stored.granularity, stored.group_size, stored.vector_dim, stored.codebook.dtype
    )
    assert choice.label() == stored_label == "2-bit tensor 4-D int8"
    assert LayerChoice("layer", LayerSpec(bits=2, rank=16), 1, 1, 0.0, 0.0).label() == "2-bit channel + rank 16"
