"""Allowed quantization options and their validation, shared by :func:`quantize_tensor` and the configs.

Every check raises ``ValueError``/``TypeError`` naming the bad value, what is allowed and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functional.fitters import METHODS
from .functional.vector_codebooks import VECTOR_DIMS, check_vector_layout


__all__ = [
    "DEFAULT_METHOD",
    "LayerSpec",
    "METHODS",
    "GRANULARITIES",
    "CODEBOOK_SCOPES",
    "CODEBOOK_DTYPES",
    "SCALED_CODEBOOK_DTYPES",
    "check_bits",
    "check_method",
    "check_granularity",
    "check_codebook_scope",
    "check_codebook_dtype",
    "check_group_size",
    "check_vector_dim",
    "check_noise_bands",
    "MAX_NOISE_BANDS",
    "setting_label",
]

VECTOR_METHODS: tuple[str, ...] = ("ot", "ot-vp")
"""The fitters with a vector form (weighted k-means in ``d`` dimensions, and its variance-preserving stretch)."""

DEFAULT_METHOD = "ot-vp"
"""The default codebook fitter. ``results/evaluation/report.md`` (both bundled reference models, deploy scope,
per-channel, 2-4 bits): ``ot-vp`` matches or beats ``ot`` on sample PSNR, class accuracy and FID at every
width, because Lloyd-Max codewords shrink each row's variance and the shrinkage compounds through the network."""
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
CODEBOOK_SCOPES: tuple[str, ...] = ("channel", "tensor")
CODEBOOK_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
SCALED_CODEBOOK_DTYPES: tuple[torch.dtype, ...] = (torch.int8,)
"""Codebook dtypes stored as integer codewords times one float32 scale per codebook (``codebook_scale``): int8
halves a vector codebook's bits against float16 (8 instead of 16 per value) at a rounding error of at most
``max |c| / 254`` per value, far below the quantization error of the codes that index it."""


def setting_label(
    bits: int,
    granularity: str,
    group_size: int | None = None,
    vector_dim: int = 1,
    codebook_dtype: torch.dtype | None = None,
) -> str:
    """A layer's setting as bits plans and evaluation reports name it: ``"3-bit channel"``, ``"2-bit group 64"``,
    ``"2-bit tensor 4-D int8"`` (vector codebooks give their dimension, int8 codebooks say so)."""
    text = f"{bits}-bit {granularity}"
    text += f" {group_size}" if group_size else ""
    text += f" {vector_dim}-D" if vector_dim > 1 else ""
    return text + (" int8" if codebook_dtype in SCALED_CODEBOOK_DTYPES else "")


def check_bits(bits: object) -> int:
    """Return ``bits`` if it is an int in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(
            f"bits={bits!r} ({type(bits).__name__}) is not an int; pass an integer from 1 to 8, e.g. bits=3."
        )
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; expected an integer from 1 to 8 (codes are stored in uint8).")
    return bits


def check_method(method: object) -> str:
    """Return ``method`` if it names a known codebook fitter."""
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is unknown; expected one of {list(METHODS)} (default {DEFAULT_METHOD!r})."
        )
    return method  # type: ignore[return-value]


def check_granularity(granularity: object) -> str:
    """Return ``granularity`` if it is 'tensor', 'channel' or 'group'."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity={granularity!r} is unknown; expected one of {list(GRANULARITIES)} "
            "('group' also needs group_size)."
        )
    return granularity  # type: ignore[return-value]


def check_codebook_scope(scope: object) -> str:
    """Return ``scope`` if it is 'channel' or 'tensor'."""
    if scope not in CODEBOOK_SCOPES:
        raise ValueError(f"codebook_scope={scope!r} is unknown; expected one of {list(CODEBOOK_SCOPES)}.")
    return scope  # type: ignore[return-value]


def check_codebook_dtype(dtype: object) -> torch.dtype | None:
    """Return ``dtype`` if it is None (automatic) or one of float16, bfloat16, float32, int8 (scaled)."""
    if dtype is not None and dtype not in CODEBOOK_DTYPES + SCALED_CODEBOOK_DTYPES:
        raise ValueError(
            f"codebook_dtype={dtype!r} is not supported; expected None (automatic) or one of "
            f"{[str(d) for d in CODEBOOK_DTYPES + SCALED_CODEBOOK_DTYPES]}."
        )
    return dtype  # type: ignore[return-value]


def check_group_size(granularity: str, group_size: object, input_dim: int | None = None) -> int | None:
    """Validate ``group_size`` for ``granularity`` and, when known, the input dimension it must divide."""
    if granularity != "group":
        if group_size is not None:
            raise ValueError(
                f"group_size={group_size!r} only applies to granularity='group', got granularity={granularity!r}; "
                "drop group_size or use granularity='group'."
            )
        return None
    if group_size is None:
        raise ValueError("granularity='group' needs group_size, e.g. group_size=64.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int, e.g. 64.")
    if input_dim is not None and input_dim % group_size != 0:
        divisors = [d for d in range(8, min(input_dim, 256) + 1) if input_dim % d == 0][-4:]
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension {input_dim}; pick a divisor "
            f"(e.g. {divisors or [input_dim]}) or use granularity='channel'."
        )
    return group_size


def check_vector_dim(vector_dim: object, bits: int, method: str, granularity: str, group_size: int | None) -> int:
    """Return ``vector_dim`` if a vector codebook of that dimension fits ``bits``, ``method`` and the groups.

    Raises:
        ValueError: an unsupported dimension, codes wider than 8 bits, a method without a vector form, or a
            ``group_size`` that is not a multiple of ``vector_dim`` (a vector never straddles two scale groups).
    """
    if isinstance(vector_dim, bool) or not isinstance(vector_dim, int):
        raise ValueError(f"vector_dim={vector_dim!r} must be an int, one of {list(VECTOR_DIMS)}.")
    check_vector_layout(bits, vector_dim)
    if vector_dim > 1 and method not in VECTOR_METHODS:
        raise ValueError(
            f"method={method!r} has no vector form; vector_dim={vector_dim} needs one of {list(VECTOR_METHODS)} "
            "(or vector_dim=1)."
        )
    if vector_dim > 1 and granularity == "group" and group_size is not None and group_size % vector_dim:
        raise ValueError(
            f"group_size={group_size} is not a multiple of vector_dim={vector_dim}; a vector may not straddle two "
            f"scale groups: pick group_size={group_size - group_size % vector_dim or vector_dim}."
        )
    return vector_dim


MAX_NOISE_BANDS = 16
"""The most noise-level bands a model may have (each costs one more set of codebooks in every layer)."""


def check_noise_bands(bands: object) -> int:
    """Return ``bands`` if it is an int from 1 to :data:`MAX_NOISE_BANDS`."""
    if isinstance(bands, bool) or not isinstance(bands, int) or not 1 <= bands <= MAX_NOISE_BANDS:
        raise ValueError(
            f"noise_bands={bands!r} must be an int from 1 (one set of codebooks) to {MAX_NOISE_BANDS}, e.g. 2."
        )
    return bands


@dataclass(frozen=True)
class LayerSpec:
    """How one weight is quantized: the arguments of :func:`~diffusers_otq.quantize_tensor`, validated.

    Attributes:
        bits: code width, 1..8.
        method: codebook fitter (one of :data:`METHODS`).
        granularity: "tensor", "channel" or "group".
        group_size: values per scale group (granularity "group" only).
        codebook_dtype: storage dtype of the codebooks (float16, bfloat16, float32, or int8 with one float32 scale
            per codebook), or None for the automatic choice.
        codebook_scope: "tensor" (one normalised codebook per weight) or "channel" (granularity "group" only).
        rank: rank of the 16-bit low-rank branch ``U V`` beside the codes (0: none).
        rotation_block: Hadamard block of the randomized input rotation (a power of two dividing the input
            channels), 0 for none.
        rotation_seed: the seed the rotation's random signs are drawn from (they are stored with the layer).
        vector_dim: codeword dimension ``d`` (1: scalar codebooks); ``d`` consecutive inputs of a row share one
            ``bits * d``-bit code into a codebook of ``2**(bits * d)`` vectors.
        noise_bands: sets of codebooks over the one set of codes, one per noise-level band of the denoiser's
            timesteps (:mod:`diffusers_otq.noise_bands`); 1: one set. Derived from the model's
            ``OTQConfig.noise_band_edges``, not set per layer.
    """

    bits: int = 4
    method: str = DEFAULT_METHOD
    granularity: str = "channel"
    group_size: int | None = None
    codebook_dtype: torch.dtype | None = None
    codebook_scope: str = "tensor"
    rank: int = 0
    rotation_block: int = 0
    rotation_seed: int = 0
    vector_dim: int = 1
    noise_bands: int = 1

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_method(self.method)
        check_granularity(self.granularity)
        check_group_size(self.granularity, self.group_size)
        check_codebook_dtype(self.codebook_dtype)
        check_codebook_scope(self.codebook_scope)
        check_vector_dim(self.vector_dim, self.bits, self.method, self.granularity, self.group_size)
        check_noise_bands(self.noise_bands)
        for name in ("rank", "rotation_block", "rotation_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0.")
        if self.rotation_block == 1 or self.rotation_block & (self.rotation_block - 1):
            raise ValueError(f"rotation_block={self.rotation_block} must be 0 (no rotation) or a power of two >= 2.")

    @property
    def structured(self) -> bool:
        """Whether the layer adds a low-rank branch or an input rotation to its codes."""
        return bool(self.rank or self.rotation_block)

    def quantize_kwargs(self) -> dict[str, object]:
        """Keyword arguments of :func:`~diffusers_otq.quantize_tensor` (all but the weight and name)."""
        return {
            "bits": self.bits,
            "method": self.method,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "codebook_dtype": self.codebook_dtype,
            "codebook_scope": self.codebook_scope,
            "vector_dim": self.vector_dim,
        }
