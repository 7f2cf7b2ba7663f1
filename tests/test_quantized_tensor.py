"""quantize_tensor / QuantizedTensor: shapes, storage accounting, exact cases, group scales and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_otq import GRANULARITIES, METHODS, LayerSpec, QuantizedTensor, quantize_tensor, relative_mse


def _group_kwargs(granularity: str) -> dict:
    return {"group_size": 16} if granularity == "group" else {}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_roundtrip_shape_dtype_and_error_bound(method: str, granularity: str, dtype: torch.dtype) -> None:
    weight = torch.randn(24, 8, 2, 2).to(dtype)  # conv-shaped, rows of 32
    q = quantize_tensor(weight, bits=4, method=method, granularity=granularity, **_group_kwargs(granularity))
    restored = q.dequantize()
    assert restored.shape == weight.shape and restored.dtype == dtype
    assert q.dequantize(torch.float64).dtype == torch.float64
    # 4 bits keeps even the crudest baseline well below the signal power.
    assert relative_mse(weight.float(), restored.float()) < 0.35, method


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_nbytes_counts_every_stored_byte(bits: int, granularity: str) -> None:
    weight = torch.randn(10, 48)
    q = quantize_tensor(weight, bits=bits, granularity=granularity, **_group_kwargs(granularity))
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(weight.numel() * bits / 8)
    stored = sum(t.numel() * t.element_size() for t in q.tensors().values())
    assert q.nbytes == stored
    assert q.bits_per_weight == pytest.approx(stored * 8 / weight.numel())
    codebooks = 10 if granularity == "channel" else 1  # group: one shared codebook by default
    fitted = weight.numel() // codebooks
    assert q.codebook.shape == (codebooks, min(2**bits, fitted))
    assert q.codebook.dtype == torch.float16
    assert torch.all(q.codebook[:, 1:] >= q.codebook[:, :-1]), "codebook rows must be ascending"


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_channel_codebook_has_at_most_2_pow_bits_values_per_row(bits: int) -> None:
    q = quantize_tensor(torch.randn(8, 200), bits=bits)
    restored = q.dequantize()
    for row in restored:
        assert row.unique().numel() <= 2**bits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "dtype,codebook_dtype",
    [(torch.float32, torch.float32), (torch.float16, None), (torch.bfloat16, None)],
    ids=["fp32+fp32-codebook", "fp16", "bf16"],
)
def test_short_rows_are_exact(method: str, dtype: torch.dtype, codebook_dtype: torch.dtype | None) -> None:
    weight = torch.randn(5, 7).to(dtype)  # 7 values per row < 2**3 codewords
    q = quantize_tensor(weight, bits=3, method=method, codebook_dtype=codebook_dtype)
    assert torch.equal(q.dequantize(), weight)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", METHODS)
def test_constant_and_zero_rows_are_exact(method: str, granularity: str) -> None:
    weight = torch.randn(6, 64)
    weight[1] = 0.3721
    weight[3] = 0.0
    weight[4] = -2.5
    # Group granularity: constant rows normalise to +-1, which a per-channel codebook holds exactly; the shared
    # default codebook reproduces them only to its resolution (documented).
    kwargs = {"group_size": 16, "codebook_scope": "channel"} if granularity == "group" else {}
    if granularity == "tensor":
        weight = torch.full((6, 64), 0.3721)
    q = quantize_tensor(weight, bits=2, method=method, granularity=granularity, codebook_dtype=torch.float32, **kwargs)
    restored = q.dequantize()
    rows = range(6) if granularity == "tensor" else (1, 3, 4)
    for r in rows:
        assert torch.equal(restored[r], weight[r]), f"row {r} changed"


def test_one_dimensional_tensors_use_one_codebook() -> None:
    q = quantize_tensor(torch.randn(300), bits=3, granularity="channel")
    assert q.codebook.shape == (1, 8)


def test_group_scales_are_counted_and_help_on_heavy_tails() -> None:
    weight = torch.distributions.StudentT(3.0).sample((64, 512))
    per_channel = quantize_tensor(weight, bits=4, granularity="channel")
    grouped = quantize_tensor(weight, bits=4, granularity="group", group_size=64, codebook_scope="channel")
    assert grouped.scale_codes.shape == (64, 8) and grouped.scale_codes.dtype == torch.uint8
    assert grouped.scale_max.shape == (64,) and grouped.scale_max.dtype == torch.float32
    assert grouped.scale_step.shape == (1,) and grouped.scale_step.dtype == torch.float32
    expected = grouped.packed.numel() + grouped.codebook.numel() * 2 + 64 * 8 + 64 * 4 + 4
    assert grouped.nbytes == expected
    assert relative_mse(weight, grouped.dequantize()) < relative_mse(weight, per_channel.dequantize())


def test_group_shared_codebook_scope() -> None:
    weight = torch.randn(32, 256)
    q = quantize_tensor(weight, bits=3, granularity="group", group_size=64, codebook_scope="tensor")
    assert q.codebook.shape == (1, 8)
    assert relative_mse(weight, q.dequantize()) < 0.05


def test_group_codebook_beats_bitsandbytes_nf4_at_equal_bits() -> None:
    """peers.md §0.3: block-64 absmax scales + one OT codebook per tensor vs NF4 (block 64, double quant)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    for weight in (torch.randn(128, 3072), torch.distributions.StudentT(5.0).sample((128, 3072))):
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        nf4 = bnb_functional.dequantize_4bit(packed, state)
        # 4-bit codes, uint8 absmax per 64, fp32 absmax per 256 blocks, fp32 offset (code tables ignored).
        nf4_bits = (packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4) * 8 / weight.numel()
        ours = quantize_tensor(weight, bits=4, granularity="group", group_size=64, codebook_scope="tensor")
        assert ours.bits_per_weight <= nf4_bits + 0.01
        assert relative_mse(weight, ours.dequantize()) < relative_mse(weight, nf4)


def test_to_device_and_codes(device: str) -> None:
    weight = torch.randn(4, 40, device=device)
    q = quantize_tensor(weight, bits=3)
    assert q.packed.device.type == device
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize().cpu())
    codes = q.codes()
    assert codes.shape == (4, 40) and int(codes.max()) < 8


def test_quantized_tensor_is_plain_data() -> None:
    q = quantize_tensor(torch.randn(3, 20), bits=2)
    assert isinstance(q, QuantizedTensor)
    assert set(q.tensors()) == {"packed", "codebook"}


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        ({"bits": 0}, ValueError, "bits=0"),
        ({"bits": 9}, ValueError, "1 to 8"),
        ({"bits": 3.0}, TypeError, "bits=3.0"),
        ({"bits": True}, TypeError, "bits=True"),
        ({"method": "kmeans"}, ValueError, "'kmeans'"),
        ({"granularity": "row"}, ValueError, "'row'"),
        ({"granularity": "group"}, ValueError, "needs group_size"),
        ({"granularity": "group", "group_size": 7}, ValueError, "does not divide the input dimension 48"),
        ({"group_size": 16}, ValueError, "only applies to granularity='group'"),
        ({"codebook_dtype": torch.uint8}, ValueError, "codebook_dtype"),
        ({"codebook_scope": "row"}, ValueError, "codebook_scope"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_options(kwargs: dict, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=None) as info:
        quantize_tensor(torch.randn(4, 48), **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "weight,error,fragment",
    [
        (torch.arange(12).reshape(3, 4), TypeError, "torch.int64"),
        (torch.tensor(1.0), ValueError, "0-d"),
        (torch.empty(0, 4), ValueError, "empty"),
        (torch.empty(3, 4, device="meta"), ValueError, "meta"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
    ids=["int", "scalar", "empty", "meta", "list"],
)
def test_bad_tensors(weight: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        quantize_tensor(weight, bits=2, name="blocks.0.proj")
    assert fragment in str(info.value) and "blocks.0.proj" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad: float) -> None:
    weight = torch.randn(4, 16)
    weight[2, 3] = bad
    with pytest.raises(ValueError, match=r"'down\.conv'.*1 NaN/Inf"):
        quantize_tensor(weight, name="down.conv")


@pytest.mark.parametrize("scale", [1e6, 1e30, 1e-8, 1e-40])
def test_rows_beyond_float16_get_float32_codebooks_or_an_error_when_float16_is_asked(scale: float) -> None:
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * scale
    weight[0] = torch.randn(64) * 0.02  # an ordinary row next to the extreme ones
    q = quantize_tensor(weight, bits=3)
    assert q.codebook.dtype == torch.float32
    error = (q.dequantize(torch.float64) - weight.double())[1:].square().sum() / weight.double()[1:].square().sum()
    assert error < 0.05  # the 3-bit fit of a Gaussian row, not a collapsed or overflowed one
    with pytest.raises(ValueError, match=r"codebook_dtype=torch\.float32"):
        quantize_tensor(weight, bits=3, codebook_dtype=torch.float16)


@pytest.mark.parametrize("scale", [1e200, 1e39, 1e-39, 1e-300])
@pytest.mark.parametrize(
    ("kwargs", "storage"),
    [({}, "float32"), ({"codebook_dtype": torch.float32}, "float32"), ({"codebook_dtype": torch.bfloat16}, "bfloat16"),
     ({"granularity": "group", "group_size": 16}, "float32")],
)  # fmt: skip
def test_float64_rows_beyond_float32_are_refused_not_stored_as_inf_or_zero(
    scale: float, kwargs: dict, storage: str
) -> None:
    weight = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight[1:] *= scale  # three rows no supported codebook dtype (or float32 group scale) can hold
    with pytest.raises(ValueError, match=rf"'big'.*absmax from .*\(torch.float64\), beyond what its torch.{storage} "
                                         r"codebooks or scales can hold.*float64 is not supported.*Rescale"):  # fmt: skip
        quantize_tensor(weight, bits=3, name="big", **kwargs)
    ordinary = quantize_tensor(weight[:1], bits=3, **kwargs)  # float64 rows inside float32's range still fit
    assert bool(torch.isfinite(ordinary.codebook).all()) and ordinary.dequantize(torch.float64).abs().amax() > 0


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("scale", [1e30, 1e19, 1e-30, 1e-40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_magnitudes_fit_as_well_as_ordinary_ones(granularity: str, scale: float, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and scale < 1e-38:
        pytest.skip("1e-40 is below bfloat16's normal range")
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(6, 128, generator=generator)
    group_size = 32 if granularity == "group" else None
    errors = {}
    for s in (1.0, scale):
        weight = (base * s).to(dtype)
        q = quantize_tensor(weight, 3, "ot-vp", granularity, group_size)
        reference = weight.double()
        errors[s] = float((q.dequantize(torch.float64) - reference).square().sum() / reference.square().sum())
    assert errors[scale] < 1.05 * errors[1.0] + 1e-3, errors


_LAYOUT_CASES = [
    (shape, granularity, group_size, scope)
    for shape in [(16, 24), (40,), (8, 3, 3, 3), (4, 2)]
    for granularity, group_size, scope in [
        ("tensor", None, "tensor"),
        ("channel", None, "tensor"),
        ("group", 8, "tensor"),
        ("group", 8, "channel"),
    ]
    if granularity != "group" or (len(shape) > 1 and math.prod(shape[1:]) % group_size == 0)
]


@pytest.mark.parametrize("shape,granularity,group_size,scope", _LAYOUT_CASES)
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_layout_matches_quantize_tensor(
    shape: tuple[int, ...], bits: int, granularity: str, group_size: int | None, scope: str, dtype: torch.dtype
) -> None:
    """The checkpoint skeleton (QuantizedTensor.empty) has exactly the tensors quantize_tensor stores."""
    weight = torch.randn(shape).to(dtype)
    spec = LayerSpec(bits=bits, granularity=granularity, group_size=group_size, codebook_scope=scope)
    real = quantize_tensor(weight, **spec.quantize_kwargs())
    empty = QuantizedTensor.empty(shape, dtype, spec)
    assert {k: (v.shape, v.dtype) for k, v in empty.tensors().items()} == {
        k: (v.shape, v.dtype) for k, v in real.tensors().items()
    }
    assert all(v.device.type == "meta" for v in empty.tensors().values())


def test_ot_vp_shared_codebook_on_a_subsample_keeps_the_tensor_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers_otq.quantized_tensor as qt

    monkeypatch.setattr(qt, "_ELEMENTS_PER_CHUNK", 1024)  # force the strided-subsample path on a small tensor
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    plain = quantize_tensor(weight, 2, "ot", "group", 64, codebook_dtype=torch.float32).dequantize()
    vp = quantize_tensor(weight, 2, "ot-vp", "group", 64, codebook_dtype=torch.float32).dequantize()
    assert plain.var() < 0.97 * weight.var()
    assert vp.var() == pytest.approx(weight.var().item(), rel=0.03)
    assert relative_mse(weight, vp) < 1.5 * relative_mse(weight, plain)


# ----------------------------------------------------------------------------------- importance (calibration)


@pytest.mark.parametrize("method", ["ot", "ot-vp"])
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_constant_importance_is_exactly_the_unweighted_fit(method: str, granularity: str) -> None:
    weight = torch.randn(16, 128)
    kwargs = {"bits": 3, "method": method, "granularity": granularity}
    if granularity == "group":
        kwargs["group_size"] = 32
    plain = quantize_tensor(weight, **kwargs)
    rows = 1 if granularity == "tensor" else 16
    for importance in (torch.full((rows, weight.numel() // rows), 3.7), torch.ones(weight.numel() // rows)):
        if granularity == "tensor" and importance.dim() == 1 and importance.numel() != weight.numel():
            continue
        weighted = quantize_tensor(weight, importance=importance, **kwargs)
        assert torch.equal(weighted.packed, plain.packed) and torch.equal(weighted.codebook, plain.codebook)


def test_importance_lowers_the_importance_weighted_error() -> None:
    weight = torch.randn(32, 256)
    importance = torch.exp(torch.randn(256) * 1.5)
    plain = quantize_tensor(weight, bits=2, method="ot")
    weighted = quantize_tensor(weight, bits=2, method="ot", importance=importance)

    def error(q):
        return float(((weight - q.dequantize()) ** 2 * importance).sum())

    assert error(weighted) < 0.95 * error(plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"importance": torch.ones(5)}, "expected \\(64,\\)"),
        ({"importance": -torch.ones(64)}, "non-negative"),
        ({"importance": torch.full((64,), float("nan"))}, "finite"),
        ({"importance": torch.zeros(64)}, "all zero"),
        ({"importance": torch.ones(64), "method": "uniform"}, "only used by the 'ot' and 'ot-vp'"),
    ],
)
def test_bad_importance(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_tensor(torch.randn(8, 64), **{"bits": 3, **kwargs})


@pytest.mark.parametrize("method", ["ot-vp", "ot", "uniform"])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_same_bits_for_any_thread_count_and_chunking(
    monkeypatch: pytest.MonkeyPatch, method: str, granularity: str
) -> None:
    import diffusers_otq.quantized_tensor as storage

    torch.manual_seed(3)  # uniform, Gaussian and heavy-tailed rows converge at different Lloyd iterations
    weight = torch.cat(
        [torch.rand(8, 2048), torch.randn(8, 2048), torch.distributions.StudentT(2.0).sample((8, 2048))]
    )
    weight = weight[torch.randperm(weight.shape[0])] * 0.02
    group_size = 64 if granularity == "group" else None
    previous = torch.get_num_threads()
    results = []
    try:
        for threads, task_elements in ((1, 1 << 22), (2, 1 << 13), (2, 1 << 22)):
            torch.set_num_threads(threads)
            monkeypatch.setattr(storage, "_ROWS_ELEMENTS_PER_TASK", task_elements)
            monkeypatch.setattr(storage, "_ELEMENTS_PER_CHUNK", task_elements)
            q = quantize_tensor(weight, 3, method, granularity, group_size, codebook_scope="channel")
            results.append(q)
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert torch.equal(other.packed, results[0].packed)
        assert torch.equal(other.codebook, results[0].codebook)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_weights_are_refused_with_the_conversion_to_do(dtype: torch.dtype) -> None:
    weight = torch.randn(8, 16).to(dtype)
    with pytest.raises(TypeError, match=r"already quantized.*weight\.to\(torch\.bfloat16\)"):
        quantize_tensor(weight, 3, name="proj")


_VECTOR_CASES = [  # bits, vector_dim, granularity, group_size, codebook_scope
    (2, 2, "channel", None, "tensor"),
    (2, 2, "group", 16, "tensor"),
    (3, 2, "group", 16, "channel"),
    (2, 4, "tensor", None, "tensor"),
    (1, 8, "group", 32, "tensor"),
]


@pytest.mark.parametrize("codebook_dtype", [None, torch.int8], ids=["float16", "int8"])
@pytest.mark.parametrize(("bits", "dim", "granularity", "group_size", "scope"), _VECTOR_CASES)
def test_vector_codebooks_store_one_code_per_vector(
    bits: int, dim: int, granularity: str, group_size: int | None, scope: str, codebook_dtype: torch.dtype | None
) -> None:
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits * dim))
    spec = LayerSpec(bits=bits, granularity=granularity, group_size=group_size, codebook_scope=scope, vector_dim=dim,
                     codebook_dtype=codebook_dtype)  # fmt: skip
    q = quantize_tensor(weight, **spec.quantize_kwargs())
    rows = 1 if granularity == "tensor" else 24
    assert q.vector_dim == dim and q.codes().shape == (rows, 24 * 64 // dim // rows)
    assert q.packed.numel() == 24 * 64 // dim * bits * dim // 8  # bits per weight of codes, exactly
    shared = granularity == "tensor" or (granularity == "group" and scope == "tensor")
    vectors_per_codebook = (24 * 64 if shared else 64) // dim
    assert q.codebook.shape == ((1 if shared else 24), min(1 << (bits * dim), vectors_per_codebook), dim)
    empty = QuantizedTensor.empty((24, 64), torch.float32, spec)
    assert {k: (v.shape, v.dtype) for k, v in empty.tensors().items()} == {
        k: (v.shape, v.dtype) for k, v in q.tensors().items()
    }
    assert (q.codebook_scale is None) == (codebook_dtype is None)  # int8: one float32 scale per codebook
    # dequantize (fused CPU kernel when built) = the codewords of the codes, laid end to end, times the scales
    codes = q.codes().long()
    book = q.flat_codebook.float().reshape(q.codebook.shape)
    vectors = book[0][codes] if book.shape[0] == 1 else book[torch.arange(book.shape[0])[:, None], codes]
    expected = vectors.reshape(rows, -1)
    scales = q.decoded_scales()
    if scales is not None:
        expected = (expected.view(24, scales.shape[1], -1) * scales[:, :, None]).reshape(24, 64)
    assert torch.equal(q.dequantize(), expected.reshape(24, 64))
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())


def test_vector_codebooks_beat_scalar_ones_at_equal_stored_bits() -> None:
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(7))

    def relative_error(**kwargs: object) -> tuple[float, float]:
        q = quantize_tensor(weight, method="ot", granularity="group", group_size=64, **kwargs)
        return float((q.dequantize() - weight).square().sum() / weight.square().sum()), q.bits_per_weight

    scalar, scalar_bits = relative_error(bits=2)
    pairs, pair_bits = relative_error(bits=2, vector_dim=2)
    quads, quad_bits = relative_error(bits=2, vector_dim=4)
    assert pair_bits - scalar_bits < 0.01 and quad_bits - scalar_bits < 0.15  # the codebooks: 512 and 16384 bits
    assert quads < pairs < 0.96 * scalar


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bits": 3, "vector_dim": 4}, "12-bit codes"),
        ({"bits": 2, "vector_dim": 3}, "vector_dim=3 is not supported"),
        ({"bits": 2, "vector_dim": 2, "method": "uniform"}, "no vector form"),
        ({"bits": 2, "vector_dim": 4, "granularity": "group", "group_size": 6}, "not a multiple of vector_dim"),
    ],
)
def test_bad_vector_options_are_refused_with_the_fix(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        quantize_tensor(torch.randn(8, 24), **kwargs)


def test_rows_that_vectors_do_not_tile_are_refused() -> None:
    with pytest.raises(ValueError, match=r"rows of 6 values, not a multiple of vector_dim=4"):
        quantize_tensor(torch.randn(8, 6), bits=2, vector_dim=4, name="proj")


def test_int8_codebooks_halve_a_vector_codebook_and_assign_codes_against_the_stored_codewords() -> None:
    weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    half, int8 = (quantize_tensor(weight, bits=2, vector_dim=4, granularity="tensor", codebook_dtype=dtype)
                  for dtype in (torch.float16, torch.int8))  # fmt: skip
    codebooks = half.codebook.shape[0]
    assert int8.codebook.shape == half.codebook.shape and int8.codebook_scale.shape == (codebooks,)
    assert int8.nbytes == half.nbytes - half.codebook.numel() + 4 * codebooks  # 8 instead of 16 bits per value
    errors = [float((q.dequantize() - weight).square().sum() / weight.square().sum()) for q in (half, int8)]
    assert errors[1] < errors[0] * 1.01, errors
    # every vector's code is its nearest codeword among the decoded int8 codewords
    book = int8.flat_codebook.reshape(int8.codebook.shape)
    distances = torch.cdist(weight.reshape(1, -1, 4), book)
    assert torch.equal(int8.codes().long(), distances.argmin(dim=2))
