"""Peer weight formats: the low-bit formats of other quantization libraries, applied to exactly our weights.

The harness compares our codebook quantizer with peers on the same tensors: every ``nn.Linear`` /
``nn.Conv2d`` weight viewed as a 2-D matrix ``(out, in * kh * kw)`` (a conv weight flattened the way our own
format flattens it). A :class:`PeerFormat` takes one float 2-D weight, runs the peer library's own public
quantize/dequantize functions on CPU in float32, and returns a :class:`PeerWeight`: the dequantized weight (what
the peer's layer computes with) and the exact number of bits the peer stores for it.

Counting convention for :attr:`PeerWeight.stored_bits` (every tensor the format stores for the weight):

* integer and packed tensors count their real storage, ``numel * element_size * 8``;
* float metadata (scales, zero-points, shifts, codebooks) counts 16 bits per element, what the format stores
  for a 16-bit model (we quantize from float32 weights, where the libraries keep their metadata in float32);
* except bitsandbytes' double-quantization statistics: the nested absmax and the offset are float32 in bnb
  whatever the model dtype, so they count 32 bits;
* library constants shared by all weights (bnb's NF4/FP4 and 8-bit lookup tables ``code``) are not counted;
* torchao's CPU layout ``unpacked_to_int8`` spends one int8 per code; it counts the nominal ``b`` bits per
  code its packed layouts store. Its int8 zero-points count 8 bits (all zero under the symmetric mapping the
  config uses, but stored).

sdnq is imported with ``SDNQ_USE_TORCH_COMPILE=0`` unless the variable is already set: on CPU it would otherwise
torch.compile its kernels once per weight shape (seconds each) for the same values. If sdnq was imported
before this module used it, its own setting stays.

The dequantized weight is the library's own output, computed with its float32 metadata; rounding the metadata
to 16 bits (as counted) would move it by about 1e-3 relative, far below the quantization error.

Formats (``b`` code bits; bits/weight on a ``(96, 320)`` weight in brackets):

========================  ==============  ==============================================================
name                      library         stored per weight
========================  ==============  ==============================================================
bnb-nf4, bnb-fp4          bitsandbytes    4 + 8/64 (uint8 absmax) + 32/(64*256) + offset   [4.128]
quanto-int4, quanto-int2  optimum-quanto  b + 2*16/g, g = 128 shrunk by 32 to divide in    [b + 0.5]
hqq-4, hqq-3, hqq-2       hqq             packed b (3 bits: 10 codes per int32) + 2*16/64  [4.5, 3.7, 2.5]
torchao-int4/3/2          torchao         b + (16 + 8)/64, per row if in % 64 != 0         [b + 0.375]
sdnq-uint4/3/2            sdnq            b + 2*16/2**(b+2)                                [4.5, 4.0, 4.0]
sdnq-uint4/3/2-codebook   sdnq            b + 16 * 2**b / in (a codebook per row)          [4.8, 3.4, 2.2]
========================  ==============  ==============================================================

Example:
    >>> import torch
    >>> from diffusers_otq.evaluation.peers import peer_format
    >>> nf4 = peer_format("bnb-nf4")
    >>> result = nf4.quantize(torch.randn(64, 128))
    >>> result.dequantized.shape, result.bits_per_weight  # 4-bit codes + uint8 absmax per 64 + fp32 statistics
    (torch.Size([64, 128]), 4.1328125)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType

import torch
from torch import nn

from ..quantized_tensor import check_weight


__all__ = [
    "PEER_FORMATS",
    "PeerFormat",
    "PeerNotApplicable",
    "PeerUnavailable",
    "PeerWeight",
    "available_peer_formats",
    "peer_format",
]

logger = logging.getLogger(__name__)

_METADATA_BITS = 16  # float metadata of a 16-bit model (see the module docstring)
_BNB_STATISTICS_BITS = 32  # bnb keeps the nested absmax and the offset in float32 for every model dtype
_BNB_BLOCKSIZE = 64  # bnb's default 4-bit block (diffusers BitsAndBytesConfig)
_HQQ_GROUP_SIZE = 64  # HQQ's default group (transformers HqqConfig)
_TORCHAO_GROUP_SIZE = 64  # the common IntxWeightOnlyConfig group

# pip package -> module to import; the first import of each is slow (seconds) and chatty, hence lazy.
_LIBRARY_MODULES: dict[str, str] = {
    "bitsandbytes": "bitsandbytes.functional",
    "optimum-quanto": "optimum.quanto",
    "hqq": "hqq.core.quantize",
    "torchao": "torchao.quantization",
    "sdnq": "sdnq",
}
# Loggers that print import/quantize noise (missing optional kernels, deprecations); muted to ERROR meanwhile.
_NOISY_LOGGERS = (
    "bitsandbytes",
    "optimum.quanto",
    "hqq",
    "torchao",
    "sdnq",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)
# sdnq compiles its quantize kernels with torch.compile on CPU unless told otherwise: several seconds per new
# weight shape (eager gives the same values to float32 rounding). The flag is read once, at sdnq's import.
_SDNQ_COMPILE_ENV = "SDNQ_USE_TORCH_COMPILE"


class PeerUnavailable(RuntimeError):
    """The library of a peer format cannot be imported; the message names the pip package to install."""


class PeerNotApplicable(ValueError):
    """The peer format cannot store a weight of this shape; the message says why."""


@dataclass(frozen=True)
class PeerWeight:
    """One weight stored in a peer format.

    Attributes:
        dequantized: the weight the peer's layer computes with, same shape and dtype as the input ``(out, in)``.
        stored_bits: every bit the format stores for this weight (codes + metadata), counted by the convention
            of the module docstring.
        layout: how the format laid out this weight, e.g. ``"groups of 64 along each row"``; records fallbacks
            such as torchao's per-row scales when ``in`` is not a multiple of 64.
    """

    dequantized: torch.Tensor
    stored_bits: int
    layout: str = ""

    @property
    def bits_per_weight(self) -> float:
        """``stored_bits / numel``: effective bits per weight including all metadata."""
        return self.stored_bits / self.dequantized.numel()


_Backend = Callable[[torch.Tensor], PeerWeight]


@dataclass(frozen=True)
class PeerFormat:
    """A peer library's weight format at one bit width.

    Attributes:
        name: registry key, e.g. ``"bnb-nf4"``.
        library: pip package providing it, e.g. ``"bitsandbytes"``.
        bits: nominal code bits (4 for NF4).
        description: one line, e.g. ``"NF4, absmax blocks of 64, double-quantized statistics"``.
        native_coverage: the layers the library's own diffusers/transformers integration quantizes by default
            (the harness applies every format to every Linear and Conv2d weight regardless).
    """

    name: str
    library: str
    bits: int
    description: str
    native_coverage: str
    _backend: _Backend = field(repr=False, compare=False)

    def quantize(self, weight: torch.Tensor) -> PeerWeight:
        """Store ``weight`` in this format and read it back.

        The weight is copied to CPU float32 (the libraries' CPU path), quantized by the library, and the
        dequantized result is cast back to the input's dtype and device. The input is never modified.

        Args:
            weight: float 2-D weight ``(out, in)``; flatten a conv weight with ``weight.flatten(1)`` first.

        Returns:
            The dequantized weight ``(out, in)`` in ``weight.dtype`` and the stored bits.

        Raises:
            TypeError: ``weight`` is not a floating-point tensor.
            ValueError: ``weight`` is not 2-D, empty, on the meta device or not finite.
            PeerUnavailable: the library is not installed.
            PeerNotApplicable: the format cannot store this shape (e.g. HQQ needs numel divisible by 64).
        """
        _check_weight(weight, self.name)
        source = weight.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        with torch.no_grad(), _quiet():
            result = self._backend(source)
        if result.dequantized.shape != weight.shape:  # a library changed its output convention
            raise RuntimeError(
                f"{self.name}: {self.library} returned a dequantized weight of shape "
                f"{tuple(result.dequantized.shape)} for a weight of shape {tuple(weight.shape)}; "
                "this peer wrapper needs updating for the installed library version."
            )
        logger.debug(
            "%s: %s -> %d bits (%.4f bits/weight), %s",
            self.name,
            tuple(weight.shape),
            result.stored_bits,
            result.stored_bits / weight.numel(),
            result.layout,
        )
        dequantized = result.dequantized.detach().to(device=weight.device, dtype=weight.dtype)
        return PeerWeight(dequantized=dequantized, stored_bits=result.stored_bits, layout=result.layout)


def _check_weight(weight: object, name: str) -> None:
    """Raise unless ``weight`` is a finite, non-empty, floating-point 2-D tensor with values."""
    weight = check_weight(weight, f"{name}: the weight")
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}; "
            "view a conv weight as weight.flatten(1), and leave 1-D tensors (biases, norms) unquantized."
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute the libraries' warnings and their WARNING/INFO log lines inside the block; restore afterwards."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _import_library(library: str) -> ModuleType:
    """Import the module of pip package ``library`` quietly; raise :class:`PeerUnavailable` if it fails."""
    module_name = _LIBRARY_MODULES[library]
    set_env = library == "sdnq" and "sdnq" not in sys.modules and _SDNQ_COMPILE_ENV not in os.environ
    if set_env:
        os.environ[_SDNQ_COMPILE_ENV] = "0"  # eager kernels; a user's own setting is left alone
    try:
        with _quiet():
            return importlib.import_module(module_name)
    except (ImportError, OSError, RuntimeError) as err:
        raise PeerUnavailable(
            f"The peer library {library!r} cannot be imported ({type(err).__name__}: {err}); "
            f"install it with `pip install {library}`, or leave its formats out of the comparison."
        ) from err
    finally:
        if set_env:
            os.environ.pop(_SDNQ_COMPILE_ENV, None)


def _integer_bits(tensor: torch.Tensor) -> int:
    """Real storage of an integer/packed tensor: ``numel * element_size * 8``."""
    return tensor.numel() * tensor.element_size() * 8


def _metadata_bits(tensor: torch.Tensor) -> int:
    """Integer tensors at their real storage; float metadata at 16 bits per element."""
    if tensor.dtype.is_floating_point:
        return tensor.numel() * _METADATA_BITS
    return _integer_bits(tensor)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` (out, in); built on meta so nothing is initialised twice."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def _groups_layout(numel: int, in_features: int, groups: int, what: str) -> str:
    """Describe ``groups`` equal groups over a weight with rows of ``in_features``."""
    group = numel // max(groups, 1)
    if group == in_features:
        return f"{what} per row of {in_features}"
    return f"{what} per group of {group}"


# --- bitsandbytes ---------------------------------------------------------------------------------------------


def _bnb(weight: torch.Tensor, quant_type: str) -> PeerWeight:
    """bnb 4-bit: codes in absmax blocks of 64, the absmax itself 8-bit quantized in blocks of 256.

    Stored: packed codes ``ceil(numel / 2)`` bytes, uint8 absmax ``ceil(numel / 64)``, float32 nested absmax
    ``ceil(numel / 64 / 256)`` and a float32 offset; the lookup tables (``code``) are library constants.
    """
    functional = _import_library("bitsandbytes")
    packed, state = functional.quantize_4bit(
        weight, blocksize=_BNB_BLOCKSIZE, compress_statistics=True, quant_type=quant_type
    )
    dequantized = functional.dequantize_4bit(packed, state)
    stored = _integer_bits(packed)
    # absmax is uint8 when nested; bnb's statistics keep their own dtype whatever the model dtype.
    stored += state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        stored += state.state2.absmax.numel() * _BNB_STATISTICS_BITS  # (ceil(blocks / 256),) float32
        stored += state.offset.numel() * _BNB_STATISTICS_BITS  # () float32 mean of the absmax
    layout = f"absmax blocks of {_BNB_BLOCKSIZE}, nested={state.nested}"
    return PeerWeight(dequantized.reshape(weight.shape), stored, layout)


# --- optimum-quanto -------------------------------------------------------------------------------------------


def _quanto(weight: torch.Tensor, bits: int) -> PeerWeight:
    """quanto qint{2,4}: affine codes with a float scale and shift per group (quanto's own group-size rule).

    Stored: ``weight._data._data`` uint8 packed codes, ``weight._scale`` and ``weight._shift`` (one per group).
    The scalar ``input_scale``/``output_scale`` buffers belong to activation quantization and are not counted.
    """
    quanto = _import_library("optimum-quanto")
    model = nn.Sequential(_linear(weight))
    quanto.quantize(model, weights=getattr(quanto, f"qint{bits}"))
    quanto.freeze(model)
    state = model.state_dict()
    codes, scale, shift = state["0.weight._data._data"], state["0.weight._scale"], state["0.weight._shift"]
    stored = _integer_bits(codes) + _metadata_bits(scale) + _metadata_bits(shift)
    layout = _groups_layout(weight.numel(), weight.shape[1], scale.numel(), "scale+shift")
    return PeerWeight(model[0].qweight.dequantize(), stored, layout)


# --- HQQ ------------------------------------------------------------------------------------------------------


def _hqq(weight: torch.Tensor, bits: int) -> PeerWeight:
    """HQQ: affine codes, scale and zero per group of 64 of the flattened weight, fitted by half-quadratic steps.

    Stored: the bit-packed codes (uint8 for 2/4 bits; int32 holding 10 codes for 3 bits, i.e. 3.2 bits/code)
    plus float ``scale`` and ``zero`` per group. Groups run over the row-major flattened weight, so they cross
    rows when ``in`` is not a multiple of 64.
    """
    if weight.numel() % _HQQ_GROUP_SIZE != 0:
        raise PeerNotApplicable(
            f"HQQ groups the flattened weight in groups of {_HQQ_GROUP_SIZE}; a weight of shape "
            f"{tuple(weight.shape)} has {weight.numel()} values, not a multiple of {_HQQ_GROUP_SIZE}."
        )
    quantizer = _import_library("hqq").Quantizer
    codes, meta = quantizer.quantize(
        weight,
        nbits=bits,
        group_size=_HQQ_GROUP_SIZE,
        axis=1,
        device="cpu",
        compute_dtype=torch.float32,
        optimize=True,
        bitpack=True,
    )
    dequantized = quantizer.dequantize(codes, meta).reshape(weight.shape)
    stored = _integer_bits(codes) + sum(_metadata_bits(v) for v in meta.values() if isinstance(v, torch.Tensor))
    layout = f"scale+zero per group of {_HQQ_GROUP_SIZE} (flattened), packing {meta.get('packing')}"
    return PeerWeight(dequantized, stored, layout)


# --- torchao --------------------------------------------------------------------------------------------------


def _torchao(weight: torch.Tensor, bits: int) -> PeerWeight:
    """torchao IntxWeightOnlyConfig: symmetric int{b} codes, a scale (and int8 zero point) per group of 64.

    When ``in`` is not a multiple of 64, per-group scales are impossible and it falls back to one scale per
    row (``PerAxis(0)``), recorded in :attr:`PeerWeight.layout`. Stored: ``qdata`` counted at ``b`` bits per
    code (the CPU layout keeps an int8 each), ``scale`` and ``zero_point``.
    """
    out_features, in_features = weight.shape
    if in_features < 2:
        raise PeerNotApplicable(
            f"torchao IntxWeightOnlyConfig fails on weights with a single input feature; got shape "
            f"{tuple(weight.shape)}."
        )
    quantization = _import_library("torchao")
    from torchao.quantization.granularity import PerAxis, PerGroup

    if in_features % _TORCHAO_GROUP_SIZE == 0:
        granularity, layout = PerGroup(_TORCHAO_GROUP_SIZE), f"scale per group of {_TORCHAO_GROUP_SIZE}"
    else:
        granularity = PerAxis(0)
        layout = f"scale per row (in_features={in_features} is not a multiple of {_TORCHAO_GROUP_SIZE})"
        logger.debug("torchao-int%d: %s for shape %s", bits, layout, (out_features, in_features))
    model = nn.Sequential(_linear(weight))
    config = quantization.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=granularity)
    quantization.quantize_(model, config)
    qweight = model[0].weight
    stored = qweight.qdata.numel() * bits + _metadata_bits(qweight.scale)
    if qweight.zero_point is not None:
        stored += _metadata_bits(qweight.zero_point)
    return PeerWeight(qweight.dequantize(), stored, layout)


# --- SDNQ -----------------------------------------------------------------------------------------------------


def _sdnq(weight: torch.Tensor, bits: int, codebook: bool) -> PeerWeight:
    """SDNQ uint{b}: asymmetric groups of ``2**(b + 2)``, or with ``codebook`` a ``2**b``-entry codebook per row.

    The minimum layer size and channel count are set to 0 so that SDNQ quantizes every weight we do (by
    default it skips layers under 16384 values or 32 input channels). Stored: the packed ``weight`` (uint8)
    and float ``scale`` (+ ``zero_point``); with a codebook, ``scale`` holds the codebooks and there is no zero.
    """
    per_pack = 8 // math.gcd(8, bits)  # values packed together: 2 at 4 bits, 8 (in 3 bytes) at 3, 4 at 2
    if weight.numel() % per_pack != 0:
        raise PeerNotApplicable(
            f"SDNQ packs uint{bits} codes {per_pack} at a time; a weight of shape {tuple(weight.shape)} has "
            f"{weight.numel()} values, not a multiple of {per_pack}."
        )
    sdnq = _import_library("sdnq")
    config = sdnq.SDNQConfig(
        weights_dtype=f"uint{bits}",
        use_codebook=codebook,
        minimum_allowed_numel=0,
        minimum_allowed_channel_size=0,
    )
    layer, _ = sdnq.sdnq_quantize_layer(_linear(weight), config, torch_dtype=torch.float32)
    state = layer.state_dict()
    if state["weight"].dtype != torch.uint8:
        raise RuntimeError(
            f"SDNQ left the weight of shape {tuple(weight.shape)} unquantized (dtype {state['weight'].dtype}); "
            "this peer wrapper needs updating for the installed sdnq version."
        )
    stored = _integer_bits(state["weight"]) + sum(_metadata_bits(v) for k, v in state.items() if k != "weight")
    scale = state["scale"]
    if codebook:
        layout = _groups_layout(weight.numel(), weight.shape[1], scale.numel() >> bits, f"{1 << bits}-entry codebook")
    else:
        layout = _groups_layout(weight.numel(), weight.shape[1], scale.numel(), "scale+zero")
    layer.dequantize()
    return PeerWeight(layer.weight, stored, layout)


# --- registry -------------------------------------------------------------------------------------------------

_BNB_COVERAGE = "nn.Linear only (diffusers BitsAndBytesConfig swaps in bnb Linear4bit)"
_QUANTO_COVERAGE = "nn.Linear only (diffusers QuantoConfig); optimum.quanto.quantize() alone also takes Conv2d"
_HQQ_COVERAGE = "nn.Linear only (transformers HqqConfig / HQQLinear; diffusers has no HQQ backend)"
_TORCHAO_COVERAGE = "nn.Linear only (diffusers TorchAoConfig; quantize_'s default filter)"
_SDNQ_COVERAGE = (
    "nn.Linear, Conv only with quant_conv=True; skips layers under 16384 values or 32 input channels "
    "(diffusers SDNQConfig defaults)"
)


def _build_formats() -> dict[str, PeerFormat]:
    """Every peer format, in the order of :data:`PEER_FORMATS`."""
    formats = [
        PeerFormat(
            name=f"bnb-{kind}",
            library="bitsandbytes",
            bits=4,
            description=f"{label}, absmax blocks of {_BNB_BLOCKSIZE}, double-quantized statistics",
            native_coverage=_BNB_COVERAGE,
            _backend=partial(_bnb, quant_type=kind),
        )
        for kind, label in (("nf4", "NF4"), ("fp4", "FP4 (e2m1)"))
    ]
    formats += [
        PeerFormat(
            name=f"quanto-int{bits}",
            library="optimum-quanto",
            bits=bits,
            description=(
                f"int{bits} affine (scale + shift) per group of 128, shrunk by 32 until it divides in "
                "(per row if in <= 128)"
            ),
            native_coverage=_QUANTO_COVERAGE,
            _backend=partial(_quanto, bits=bits),
        )
        for bits in (4, 2)
    ]
    formats += [
        PeerFormat(
            name=f"hqq-{bits}",
            library="hqq",
            bits=bits,
            description=(
                f"{bits}-bit affine (scale + zero) per group of {_HQQ_GROUP_SIZE} of the flattened weight, "
                "half-quadratic optimized"
            ),
            native_coverage=_HQQ_COVERAGE,
            _backend=partial(_hqq, bits=bits),
        )
        for bits in (4, 3, 2)
    ]
    formats += [
        PeerFormat(
            name=f"torchao-int{bits}",
            library="torchao",
            bits=bits,
            description=(
                f"symmetric int{bits}, scale per group of {_TORCHAO_GROUP_SIZE} "
                f"(per row if in % {_TORCHAO_GROUP_SIZE} != 0), IntxWeightOnlyConfig"
            ),
            native_coverage=_TORCHAO_COVERAGE,
            _backend=partial(_torchao, bits=bits),
        )
        for bits in (4, 3, 2)
    ]
    formats += [
        PeerFormat(
            name=f"sdnq-uint{bits}",
            library="sdnq",
            bits=bits,
            description=(
                f"uint{bits} asymmetric (scale + zero point) per group of {1 << (bits + 2)} (SDNQ's nn.Linear default)"
            ),
            native_coverage=_SDNQ_COVERAGE,
            _backend=partial(_sdnq, bits=bits, codebook=False),
        )
        for bits in (4, 3, 2)
    ]
    formats += [
        PeerFormat(
            name=f"sdnq-uint{bits}-codebook",
            library="sdnq",
            bits=bits,
            description=(
                f"uint{bits} codes into a {1 << bits}-entry codebook per group of {1 << (bits + 5)} "
                "(per row if in <= that)"
            ),
            native_coverage=_SDNQ_COVERAGE,
            _backend=partial(_sdnq, bits=bits, codebook=True),
        )
        for bits in (4, 3, 2)
    ]
    return {fmt.name: fmt for fmt in formats}


PEER_FORMATS: dict[str, PeerFormat] = _build_formats()
"""Every peer format by name, in a fixed order: bnb, quanto, hqq, torchao, sdnq, sdnq with codebooks."""


def peer_format(name: str) -> PeerFormat:
    """The peer format called ``name``.

    Example:
        >>> peer_format("hqq-3").library, peer_format("hqq-3").bits
        ('hqq', 3)

    Raises:
        ValueError: ``name`` is not in :data:`PEER_FORMATS`; the message lists the valid names.
    """
    try:
        return PEER_FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown peer format {name!r}; expected one of {list(PEER_FORMATS)}.") from None


def available_peer_formats() -> list[str]:
    """Names of the peer formats whose library imports here, in :data:`PEER_FORMATS` order.

    Imports each library once (seconds each, the first time); a library that fails is logged at INFO.
    """
    usable: dict[str, bool] = {}
    for library in dict.fromkeys(fmt.library for fmt in PEER_FORMATS.values()):
        try:
            _import_library(library)
            usable[library] = True
        except PeerUnavailable as err:
            logger.info("%s", err)
            usable[library] = False
    return [name for name, fmt in PEER_FORMATS.items() if usable[fmt.library]]
