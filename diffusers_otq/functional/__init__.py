"""Pure tensor math: codebook fitting, bit packing, group scales and metrics (imports torch only)."""

from .fitters import FITTERS, METHODS, CodebookFit, fit_codebook
from .lloyd_max import lloyd_max_codebook
from .metrics import relative_mse, wasserstein2
from .packing import pack_codes, packed_num_bytes, unpack_codes
from .scales import GroupScales, decode_group_scales, encode_group_scales


__all__ = [
    "FITTERS",
    "METHODS",
    "CodebookFit",
    "GroupScales",
    "decode_group_scales",
    "encode_group_scales",
    "fit_codebook",
    "lloyd_max_codebook",
    "pack_codes",
    "packed_num_bytes",
    "relative_mse",
    "unpack_codes",
    "wasserstein2",
]
