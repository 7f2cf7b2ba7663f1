"""``OTQLinear`` and ``OTQConv2d``: layers whose weight lives in a :class:`QuantizedTensor`'s packed buffers.

The packed tensors are registered buffers (``packed``, ``codebook`` and, for group granularity, ``scale_codes``,
``scale_max`` and ``scale_step``), so ``.to(device)``, ``state_dict()`` and safetensors work unchanged. The bias stays a float
parameter. The reference forward dequantizes to the input's dtype and calls ``F.linear``/``F.conv2d``.

Dtype casts (``model.half()``, ``model.to(torch.bfloat16)``) change the bias and the compute dtype reported by
``weight``, never the stored codebooks or scales: re-rounding them would silently change the quantized weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .options import DEFAULT_METHOD, LayerSpec
from .quantized_tensor import QuantizedTensor, quantize_tensor


__all__ = ["OTQLinear", "OTQConv2d", "OTQLayerMixin", "QUANTIZED_BUFFERS"]

QUANTIZED_BUFFERS: tuple[str, ...] = ("packed", "codebook", "scale_codes", "scale_max", "scale_step")


class OTQLayerMixin:
    """Shared storage and bookkeeping of the OTQ layers (must come before ``nn.Module`` in the bases)."""

    float_type: type[nn.Module]
    bits: int
    method: str
    granularity: str
    group_size: int | None
    weight_shape: torch.Size
    weight_dtype: torch.dtype

    def _init_quantized(self, quantized: QuantizedTensor) -> None:
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__}: OTQLayerMixin must be combined with nn.Module.")
        self.bits = quantized.bits
        self.method = quantized.method
        self.granularity = quantized.granularity
        self.group_size = quantized.group_size
        self.weight_shape = torch.Size(quantized.shape)
        self.weight_dtype = quantized.dtype
        for key, tensor in quantized.tensors().items():
            self.register_buffer(key, tensor)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        bits: int = 4,
        method: str = DEFAULT_METHOD,
        granularity: str = "channel",
        group_size: int | None = None,
        *,
        name: str | None = None,
        **kwargs: Any,
    ) -> OTQLayerMixin:
        """Quantize a float layer of the matching type (extra kwargs go to :func:`quantize_tensor`)."""
        if not isinstance(module, cls.float_type):
            raise TypeError(
                f"{cls.__name__}.from_module needs an nn.{cls.float_type.__name__}, "
                f"got {type(module).__name__} ({name or 'unnamed'})."
            )
        quantized = quantize_tensor(module.weight, bits, method, granularity, group_size, name=name, **kwargs)
        return cls.from_quantized(quantized, module)

    @classmethod
    def from_quantized(cls, quantized: QuantizedTensor, module: nn.Module) -> OTQLayerMixin:
        """Wrap ``quantized`` as the weight of a layer shaped like the float ``module`` (whose bias is copied)."""
        raise NotImplementedError

    @classmethod
    def empty_like(
        cls, module: nn.Module, spec: LayerSpec, dtype: torch.dtype | None = None, device: torch.device | str = "meta"
    ) -> OTQLayerMixin:
        """An uninitialised layer with the storage layout of ``module``'s weight quantized by ``spec``.

        Used to build the skeleton a pre-quantized checkpoint is loaded into; ``dtype`` is the compute dtype
        (default: the float weight's dtype).
        """
        weight = module.weight
        quantized = QuantizedTensor.empty(tuple(weight.shape), dtype or weight.dtype, spec, device=device)
        return cls.from_quantized(quantized, module)

    def _init_bias(self, bias: torch.Tensor | None) -> None:
        """Keep the float bias (original precision and requires_grad) as a parameter."""
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def quantized_weight(self) -> QuantizedTensor:
        """A :class:`QuantizedTensor` view of the stored buffers (no copy)."""
        return QuantizedTensor(
            packed=self.packed,
            codebook=self.codebook,
            shape=self.weight_shape,
            dtype=self.weight_dtype,
            bits=self.bits,
            method=self.method,
            granularity=self.granularity,
            group_size=self.group_size,
            scale_codes=getattr(self, "scale_codes", None),
            scale_max=getattr(self, "scale_max", None),
            scale_step=getattr(self, "scale_step", None),
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstructed float weight in ``dtype`` (default: the layer's compute dtype)."""
        return self.quantized_weight().dequantize(dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor on every access, not a parameter; prefer ``dequantize_weight``)."""
        return self.dequantize_weight()

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes, codebooks, scales), bias excluded."""
        return self.quantized_weight().nbytes

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        before = {name: self._buffers[name] for name in QUANTIZED_BUFFERS if self._buffers.get(name) is not None}
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.packed.device))
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the stored values, follow only the device
                self._buffers[name] = old.to(device=new.device)
        if probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
        return result

    def _quant_repr(self) -> str:
        text = f"bits={self.bits}, method={self.method}, granularity={self.granularity}"
        if self.group_size is not None:
            text += f", group_size={self.group_size}"
        return text


class OTQLinear(OTQLayerMixin, nn.Module):
    """``nn.Linear`` with a codebook-quantized weight.

    Example:
        >>> import torch
        >>> from diffusers_otq import OTQLinear
        >>> layer = OTQLinear.from_module(torch.nn.Linear(64, 32), bits=3)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    float_type = nn.Linear

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(quantized.shape) != 2:
            raise ValueError(f"OTQLinear needs a 2-D weight (out, in), got shape {tuple(quantized.shape)}.")
        self.out_features, self.in_features = quantized.shape
        self._init_quantized(quantized)
        self._init_bias(bias)

    @classmethod
    def from_quantized(cls, quantized: QuantizedTensor, module: nn.Module) -> OTQLinear:
        return cls(quantized, module.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.dequantize_weight(input.dtype), bias)

    def dequantize(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the reconstructed weight."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.dequantize_weight())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " + (
            self._quant_repr()
        )


class OTQConv2d(OTQLayerMixin, nn.Module):
    """``nn.Conv2d`` with a codebook-quantized weight (any stride, padding, dilation, groups and padding mode).

    Example:
        >>> import torch
        >>> from diffusers_otq import OTQConv2d
        >>> layer = OTQConv2d.from_module(torch.nn.Conv2d(8, 16, 3, padding=1), bits=4)
        >>> layer(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    float_type = nn.Conv2d

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> None:
        super().__init__()
        if len(quantized.shape) != 4:
            raise ValueError(f"OTQConv2d needs a 4-D weight (out, in/groups, kh, kw), got {tuple(quantized.shape)}.")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self._init_quantized(quantized)
        self._init_bias(bias)

    @classmethod
    def from_quantized(cls, quantized: QuantizedTensor, module: nn.Module) -> OTQConv2d:
        return cls(quantized, module.bias, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_weight(input.dtype)
        bias = None if self.bias is None else self.bias.to(input.dtype)
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def dequantize(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the reconstructed weight."""
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        layer.weight = nn.Parameter(self.dequantize_weight())
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return f"{text}, bias={self.bias is not None}, {self._quant_repr()}"
