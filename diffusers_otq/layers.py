"""``OTQLinear`` and ``OTQConv2d``: layers whose weight lives in a :class:`QuantizedTensor`'s packed buffers.

The bit-packed codes are the layer's ``weight`` *parameter* (uint8, ``requires_grad=False``), as bitsandbytes
stores its packed bytes in a ``Params4bit`` under ``weight``; the small side tensors are buffers (``codebook``,
``codebook_scale`` for int8 codebooks and, for group granularity, ``scale_codes``, ``scale_max`` and
``scale_step``). So ``.to(device)``,
``state_dict()`` and safetensors work unchanged, tools that look up ``<module>.weight`` in a state dict
(diffusers' LoRA loaders) find the layer, and offloading treats the codes as the weight they are: accelerate's
hooks (sequential CPU offload, ``device_map`` offload) always offload parameters but keep buffers on the
execution device unless ``offload_buffers=True``, so the bulk of the layer leaves the accelerator while the
side tensors stay, like bitsandbytes' quantization state. Attribute access ``layer.weight`` is the dequantized
read-only view; ``layer.packed`` is the stored codes; :meth:`OTQLayerMixin.stored_tensors` lists every stored
tensor. The bias stays a float parameter. Two optional pieces of :mod:`diffusers_otq.structure` add buffers of
their own: a low-rank branch (``lowrank_up``, ``lowrank_down``) and an input rotation (``rotation_signs``).
The forward is::

    x' = rotate(x)                                   # identity without a rotation
    y  = base(x', codes_weight) + up(down(x')) + b   # base: F.linear / F.conv2d; the branch only with rank > 0

``codes_weight`` (:meth:`OTQLayerMixin.codes_weight`) is the one place that turns codes into a float weight,
the hook a fused dequantization kernel replaces. :meth:`~OTQLayerMixin.dequantize_weight` (and ``.weight``)
is the *effective* weight in the original input space, ``(Q + U V) R``: what a LoRA merges into, what
``dequantize()`` restores and what metrics compare.

Dtype casts (``model.half()``, ``model.to(torch.bfloat16)``) change the bias and the compute dtype reported by
``weight``, never the stored codebooks, scales or factors: re-rounding them would silently change the layer.

``layer.weight`` names two things: the stored codes (in ``_parameters``, what ``named_parameters()`` and
``state_dict()`` list) and the dequantized view (what attribute access returns, for peft and LoRA loaders).
Code that manages storage reads a module's tensors back by attribute, ``getattr(module, name)`` for a name from
``named_parameters()``/``named_buffers()``, and writes what it read (moved) into ``module._parameters``: that is
what accelerate's ``set_module_tensor_to_device`` does in every offload hook. Handed the float view, it would
store the dequantized weight in place of the codes. So attribute access returns the stored codes to such code:
while the codes are on the meta device (a skeleton being loaded, or an offloaded layer between forwards) and to
callers inside accelerate (:data:`STORAGE_MANAGERS`); everyone else gets the view.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional.dequant_ops import fused_linear_available, tiled_linear
from .options import DEFAULT_METHOD, LayerSpec
from .quantized_tensor import QuantizedTensor, quantize_tensor
from .structure import InputRotation, LowRankBranch, lowrank_dtype
from .weight_view import ReadOnlyWeight


__all__ = [
    "CODE_BUFFERS",
    "LEGACY_BUFFER_NAMES",
    "OTQConv2d",
    "OTQLayerMixin",
    "OTQLinear",
    "QUANTIZED_BUFFERS",
    "STORAGE_MANAGERS",
    "STRUCTURE_BUFFERS",
]

CODE_BUFFERS: tuple[str, ...] = ("weight", "codebook", "codebook_scale", "scale_codes", "scale_max", "scale_step")
STRUCTURE_BUFFERS: tuple[str, ...] = ("lowrank_up", "lowrank_down", "rotation_signs")
QUANTIZED_BUFFERS: tuple[str, ...] = CODE_BUFFERS + STRUCTURE_BUFFERS
"""Every stored tensor of an OTQ layer (a layer registers those it uses): ``weight`` (the codes) is a parameter, the
others are buffers; the bias is a float parameter besides them."""
STORAGE_MANAGERS: tuple[str, ...] = ("accelerate.",)
"""Module-name prefixes of code that reads ``layer.weight`` as the stored tensor (see the module doc)."""
LEGACY_BUFFER_NAMES: dict[str, str] = {"packed": "weight"}
"""Stored names of format versions 1-2 and their current names (the codes were ``packed`` before version 3)."""


def _reads_storage(frame: Any) -> bool:
    """Whether the code running in ``frame`` manages module storage (:data:`STORAGE_MANAGERS`); never while
    compiling (storage code does not run inside a compiled graph, and frames are not traceable)."""
    if torch.compiler.is_compiling():
        return False
    return frame.f_globals.get("__name__", "").startswith(STORAGE_MANAGERS)


class OTQLayerMixin:
    """Shared storage and bookkeeping of the OTQ layers (must come before ``nn.Module`` in the bases)."""

    float_type: type[nn.Module]
    bits: int
    method: str
    granularity: str
    group_size: int | None
    vector_dim: int
    noise_bands: int  # sets of codebooks over the shared codes (diffusers_otq.noise_bands)
    noise_band: int  # the set the forward decodes
    weight_shape: torch.Size
    weight_dtype: torch.dtype
    rank: int
    rotation_block: int
    rotation_dim: int  # the weight's input-channel axis, which a rotation mixes

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Called like the float class (``OTQConv2d(8, 16, 3)``: no :class:`QuantizedTensor`), build that float
        layer instead: libraries that make companion layers with ``type(layer)(...)``, as peft does for the LoRA
        factors of a convolution, get ordinary float layers."""
        first = args[0] if args else kwargs.get("quantized")
        if (args or kwargs) and not isinstance(first, QuantizedTensor):  # no arguments: copy/pickle protocol
            return cls.float_type(*args, **kwargs)
        return super().__new__(cls)

    def _init_quantized(
        self, quantized: QuantizedTensor, lowrank: LowRankBranch | None = None, rotation: InputRotation | None = None
    ) -> None:
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__}: OTQLayerMixin must be combined with nn.Module.")
        self.bits = quantized.bits
        self.method = quantized.method
        self.granularity = quantized.granularity
        self.group_size = quantized.group_size
        self.vector_dim = quantized.vector_dim
        self.noise_bands = quantized.noise_bands
        self.noise_band = 0
        self.weight_shape = torch.Size(quantized.shape)
        self.weight_dtype = quantized.dtype
        for key, tensor in quantized.tensors().items():
            self.set_stored(LEGACY_BUFFER_NAMES.get(key, key), tensor)
        rows, width = self.weight_shape[0], self.weight_shape[1:].numel()
        if lowrank is not None and (lowrank.up.shape[0], lowrank.down.shape[1]) != (rows, width):
            raise ValueError(
                f"low-rank factors {tuple(lowrank.up.shape)} x {tuple(lowrank.down.shape)} do not fit a weight of shape "
                f"{tuple(self.weight_shape)} (need ({rows}, r) x (r, {width}))."
            )
        if rotation is not None and rotation.channels != self.weight_shape[1]:
            raise ValueError(
                f"the rotation mixes {rotation.channels} channels, but the weight {tuple(self.weight_shape)} has "
                f"{self.weight_shape[1]} input channels."
            )
        self.rank = 0 if lowrank is None else lowrank.rank
        self.rotation_block = 0 if rotation is None else rotation.block
        for piece in (lowrank, rotation):
            for key, tensor in ({} if piece is None else piece.tensors()).items():
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
    def from_quantized(
        cls,
        quantized: QuantizedTensor,
        module: nn.Module,
        lowrank: LowRankBranch | None = None,
        rotation: InputRotation | None = None,
    ) -> OTQLayerMixin:
        """Wrap ``quantized`` (and the optional low-rank branch and input rotation it was fitted with) as the weight
        of a layer shaped like the float ``module`` (whose bias is copied)."""
        return cls(quantized, module.bias, *cls._geometry(module), lowrank=lowrank, rotation=rotation)

    @classmethod
    def _geometry(cls, module: nn.Module) -> tuple[Any, ...]:
        """Constructor arguments, after the bias, that describe ``module`` beyond its weight."""
        return ()

    @classmethod
    def empty_like(
        cls, module: nn.Module, spec: LayerSpec, dtype: torch.dtype | None = None, device: torch.device | str = "meta"
    ) -> OTQLayerMixin:
        """An uninitialised layer with the storage layout of ``module``'s weight quantized by ``spec``.

        Used to build the skeleton a pre-quantized checkpoint is loaded into; ``dtype`` is the compute dtype
        (default: the float weight's dtype).
        """
        weight = module.weight
        dtype = dtype or weight.dtype
        quantized = QuantizedTensor.empty(tuple(weight.shape), dtype, spec, device=device)
        rows, width = weight.shape[0], weight[0].numel()
        lowrank = LowRankBranch.empty(rows, width, spec.rank, lowrank_dtype(dtype), device) if spec.rank else None
        rotation = InputRotation.empty(weight.shape[1], spec.rotation_block, device) if spec.rotation_block else None
        return cls.from_quantized(quantized, module, lowrank, rotation)

    def _init_bias(self, bias: torch.Tensor | None) -> None:
        """Keep the float bias (original precision and requires_grad) as a parameter."""
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @property
    def packed(self) -> torch.Tensor:
        """The bit-packed codes (the ``weight`` parameter and state-dict entry)."""
        return self._parameters["weight"]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor of the layer by name (the codes under ``weight``), bias excluded; no copies."""
        stored = {"weight": self._parameters["weight"]}
        stored.update((name, self._buffers[name]) for name in QUANTIZED_BUFFERS if self._buffers.get(name) is not None)
        return stored

    def set_stored(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` as the layer's ``name`` (one of :data:`QUANTIZED_BUFFERS`), as is (no cast, no copy).

        The codes (``weight``) become a parameter that never requires a gradient, the rest buffers. Registered
        directly: ``weight`` is a class property (the dequantized view), so ``register_parameter`` would refuse it.
        """
        if name not in QUANTIZED_BUFFERS:
            raise KeyError(f"{type(self).__name__}: {name!r} is not a stored tensor name; expected one of "
                           f"{list(QUANTIZED_BUFFERS)}.")  # fmt: skip
        if name == "weight":
            data = tensor.detach() if isinstance(tensor, nn.Parameter) else tensor
            self._parameters[name] = nn.Parameter(data, requires_grad=False)
        else:
            self._buffers[name] = tensor

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for old, new in LEGACY_BUFFER_NAMES.items():  # state dicts of format versions 1-2
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

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
            vector_dim=self.vector_dim,
            codebook_scale=getattr(self, "codebook_scale", None),
            noise_bands=self.noise_bands,
            noise_band=self.noise_band,
        )

    def set_noise_band(self, band: int) -> None:
        """Decode the codebooks of noise band ``band`` from now on (see :mod:`diffusers_otq.noise_bands`).

        Raises:
            IndexError: ``band`` is not in ``0 .. noise_bands - 1``.
        """
        if isinstance(band, bool) or not isinstance(band, int) or not 0 <= band < self.noise_bands:
            raise IndexError(
                f"{type(self).__name__}: noise band {band!r} does not exist; this layer has {self.noise_bands} "
                f"(0..{self.noise_bands - 1})."
            )
        self.noise_band = band

    def lowrank_branch(self) -> LowRankBranch | None:
        """A view of the stored low-rank factors, or None (rank 0)."""
        return LowRankBranch(self.lowrank_up, self.lowrank_down) if self.rank else None

    def input_rotation(self) -> InputRotation | None:
        """A view of the stored input rotation, or None."""
        if not self.rotation_block:
            return None
        return InputRotation(self.rotation_signs, self.weight_shape[1], self.rotation_block)

    def codes_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q``: the codes looked up in their codebooks (times group scales), in the rotated input space.

        The single decode point of the forward; a fused dequantization path replaces this method.
        """
        return self.quantized_weight().dequantize(dtype or self.weight_dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective float weight ``(Q + U V) R`` in the original input space, in ``dtype`` (default: the
        layer's compute dtype): ``F.linear(x, w)`` / ``F.conv2d(x, w)`` with it equals the layer's forward."""
        dtype = dtype or self.weight_dtype
        lowrank, rotation = self.lowrank_branch(), self.input_rotation()
        if lowrank is None and rotation is None:
            return self.codes_weight(dtype)
        work = torch.promote_types(dtype, torch.float32)
        weight = self.codes_weight(work)
        if lowrank is not None:
            weight = weight + lowrank.product(work).reshape(self.weight_shape)
        if rotation is not None:
            weight = rotation.unrotate(weight, dim=1)
        return weight.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight as a read-only view (:class:`~diffusers_otq.weight_view.ReadOnlyWeight`): dequantized
        afresh on every access, not a parameter, and in-place writes (a LoRA fuse) raise. Prefer
        ``dequantize_weight`` for a plain tensor.

        The stored codes instead while they are on the meta device and for accelerate's storage code (module doc).
        """
        packed = self.packed
        if packed.device.type == "meta" or _reads_storage(sys._getframe(1)):  # storage code: see the module doc
            return packed
        return ReadOnlyWeight.wrap(self.dequantize_weight(), f"{type(self).__name__}{tuple(self.weight_shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes, codebooks, scales, low-rank factors, rotation signs), bias excluded."""
        extra = sum(piece.nbytes for piece in (self.lowrank_branch(), self.input_rotation()) if piece is not None)
        return self.quantized_weight().nbytes + extra

    @property
    def bits_per_weight(self) -> float:
        """``nbytes * 8`` per weight element: every stored bit counted."""
        return self.nbytes * 8 / self.weight_shape.numel()

    def _check_input(self, input: torch.Tensor) -> None:
        if not input.is_floating_point():  # nn.Linear/nn.Conv2d refuse these too; decoding to int would truncate
            raise TypeError(
                f"{type(self).__name__} expects a floating-point input, got dtype {input.dtype}; cast it first "
                "(e.g. x.float())."
            )

    def _rotate_input(self, input: torch.Tensor, channel_dim: int) -> torch.Tensor:
        rotation = self.input_rotation()
        return input if rotation is None else rotation.rotate(input, dim=channel_dim)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        # `.detach()`: the parameter object survives `_apply` with its `.data` swapped, so keep the old tensor itself
        before = {name: tensor.detach() for name, tensor in self.stored_tensors().items()}
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.packed.device))
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        after = self.stored_tensors()
        for name, old in before.items():
            new = after[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the stored values, follow only the device
                self.set_stored(name, old.to(device=new.device))
        if probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
        return result

    def _quant_repr(self) -> str:
        text = f"bits={self.bits}, method={self.method}, granularity={self.granularity}"
        if self.group_size is not None:
            text += f", group_size={self.group_size}"
        if self.vector_dim > 1:
            text += f", vector_dim={self.vector_dim}"
        if self.noise_bands > 1:
            text += f", noise_bands={self.noise_bands}"
        if self.rank:
            text += f", rank={self.rank}"
        if self.rotation_block:
            text += f", rotation_block={self.rotation_block}"
        return text


class OTQLinear(OTQLayerMixin, nn.Linear):
    """``nn.Linear`` with a codebook-quantized weight.

    A subclass of ``nn.Linear`` (peft, diffusers' LoRA loaders and ``isinstance`` checks treat it as one) whose
    ``weight`` is a dequantized read-only view and whose stored tensors are the packed buffers.

    Example:
        >>> import torch
        >>> from diffusers_otq import OTQLinear
        >>> layer = OTQLinear.from_module(torch.nn.Linear(64, 32), bits=3)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    float_type = nn.Linear

    def __init__(
        self,
        quantized: QuantizedTensor,
        bias: torch.Tensor | None = None,
        lowrank: LowRankBranch | None = None,
        rotation: InputRotation | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        if len(quantized.shape) != 2:
            raise ValueError(f"OTQLinear needs a 2-D weight (out, in), got shape {tuple(quantized.shape)}.")
        self.out_features, self.in_features = quantized.shape
        self._init_quantized(quantized, lowrank, rotation)
        self._init_bias(bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        bias = None if self.bias is None else self.bias.to(input.dtype)
        x = self._rotate_input(input, -1)
        if self._use_fused(x):  # tile by tile (CPU scratch or GPU registers), no full-size weight
            out = self._fused_linear(x, bias)
        else:
            out = F.linear(x, self.codes_weight(input.dtype), bias)
        if self.rank:
            out = out + F.linear(F.linear(x, self.lowrank_down.to(input.dtype)), self.lowrank_up.to(input.dtype))
        return out

    def _use_fused(self, x: torch.Tensor) -> bool:
        """A fused kernel applies: per-row storage, nothing that needs a gradient through the weight's codebooks or
        into ``x`` (the custom op has no backward), and the CPU extension built or Triton on a GPU."""
        if self.granularity == "tensor" or x.dim() == 0:
            return False
        if self.quantized_weight().needs_grad or (torch.is_grad_enabled() and x.requires_grad):
            return False
        return fused_linear_available(x.device)

    def _fused_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        bias = x2d.new_empty(0) if bias is None else bias
        out = tiled_linear(x2d, self.packed, *self.quantized_weight().kernel_inputs(), bias, self.out_features,
                           self.in_features, self.bits, self.vector_dim)  # fmt: skip
        return out.reshape(*x.shape[:-1], self.out_features)

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


class OTQConv2d(OTQLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with a codebook-quantized weight (any stride, padding, dilation, groups and padding mode).

    A subclass of ``nn.Conv2d`` whose ``weight`` is a dequantized read-only view (see :class:`OTQLinear`).

    Example:
        >>> import torch
        >>> from diffusers_otq import OTQConv2d
        >>> layer = OTQConv2d.from_module(torch.nn.Conv2d(8, 16, 3, padding=1), bits=4)
        >>> layer(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    float_type = nn.Conv2d

    def __init__(
        self,
        quantized: QuantizedTensor,
        bias: torch.Tensor | None,
        conv: nn.Conv2d,
        lowrank: LowRankBranch | None = None,
        rotation: InputRotation | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Conv2d.__init__: no float weight is ever allocated
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
        self.transposed, self.output_padding = False, (0, 0)
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        if (lowrank is not None or rotation is not None) and conv.groups != 1:
            raise ValueError(
                f"a low-rank branch or an input rotation needs groups=1, got a conv with groups={conv.groups}; "
                "quantize grouped convs without rank/rotation (module_overrides={pattern: {'rank': 0, 'rotation': "
                "False}})."
            )
        self._init_quantized(quantized, lowrank, rotation)
        self._init_bias(bias)

    @classmethod
    def _geometry(cls, module: nn.Module) -> tuple[Any, ...]:
        return (module,)  # stride, padding, dilation, groups, padding mode

    def _conv(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        bias = None if self.bias is None else self.bias.to(input.dtype)
        x = self._rotate_input(input, 1)
        out = self._conv(x, self.codes_weight(input.dtype), bias)
        if self.rank:
            down = self.lowrank_down.to(input.dtype).reshape(self.rank, *self.weight_shape[1:])
            up = self.lowrank_up.to(input.dtype)[:, :, None, None]
            out = out + F.conv2d(self._conv(x, down, None), up)
        return out

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
