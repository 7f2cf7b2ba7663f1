"""The peer libraries' own runtime layers for scripts/bench_runtime.py (what a user of each backend runs).

Every builder takes a float ``nn.Linear`` in the benchmark dtype and returns a module computing ``x -> y`` with
the library's quantized weight and its own forward kernel; a library that is missing or cannot handle the
dtype raises, and the benchmark prints "n/a" for it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn


def _bnb_nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data.float().clone(), requires_grad=False, quant_type="nf4")
    layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _quanto(bits: int) -> Callable[[nn.Linear], nn.Module]:
    def build(linear: nn.Linear) -> nn.Module:
        from optimum.quanto import freeze, qint2, qint4, quantize

        model = nn.Sequential(copy.deepcopy(linear))
        quantize(model, weights={2: qint2, 4: qint4}[bits])
        freeze(model)
        return model

    return build


def _hqq(bits: int) -> Callable[[nn.Linear], nn.Module]:
    def build(linear: nn.Linear) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=bits, group_size=64)
        return HQQLinear(copy.deepcopy(linear).float(), config, compute_dtype=linear.weight.dtype, device="cpu")

    return build


def _torchao_int4(linear: nn.Linear) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model = nn.Sequential(copy.deepcopy(linear))
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    return model


class _AtenInt4Pack(nn.Module):
    """torch's fused CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, bf16 activations, groups of 64): the
    asymmetric min-max int4 weight it would compute with."""

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__()
        if linear.weight.dtype != torch.bfloat16:
            raise TypeError("aten int4pack runs on bfloat16 activations only")
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(out_features, in_features), 1)
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=2).to(torch.bfloat16).contiguous()
        self.group_size = group_size
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias


def _sdnq(bits: int, codebook: bool) -> Callable[[nn.Linear], nn.Module]:
    def build(linear: nn.Linear) -> nn.Module:
        import sdnq

        config = sdnq.SDNQConfig(weights_dtype=f"uint{bits}", use_codebook=codebook, minimum_allowed_numel=0,
                                 minimum_allowed_channel_size=0)  # fmt: skip
        layer, _ = sdnq.sdnq_quantize_layer(copy.deepcopy(linear), config, torch_dtype=linear.weight.dtype)
        return layer

    return build


PEER_LAYERS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "bnb-nf4": _bnb_nf4,
    "quanto-int4": _quanto(4),
    "quanto-int2": _quanto(2),
    "hqq-3 (g64)": _hqq(3),
    "torchao-int4 (g64)": _torchao_int4,
    "aten int4pack (g64)": _AtenInt4Pack,
    "sdnq-uint3": _sdnq(3, codebook=False),
    "sdnq-uint3-codebook": _sdnq(3, codebook=True),
}


def build_peer(name: str, linear: nn.Linear) -> tuple[nn.Module | None, str]:
    """``(module, "")`` or ``(None, reason)`` when the library is missing or refuses this layer/dtype."""
    try:
        with torch.no_grad():
            module = PEER_LAYERS[name](linear)
            probe = torch.zeros(1, linear.in_features, dtype=linear.weight.dtype)
            out = module(probe)
        if out.shape != (1, linear.out_features) or not math.isfinite(float(out.float().abs().sum())):
            return None, f"bad output {tuple(out.shape)}"
        return module, ""
    except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
