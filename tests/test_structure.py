"""Low-rank branches and input rotations: layer function, exact bookkeeping, checkpoints, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_otq import FORMAT_VERSION, OTQConfig, OTQConv2d, OTQLinear, quantize_model
from diffusers_otq.checkpoint import read_safetensors_header, tensor_checksum
from diffusers_otq.fitting import fit_data_free
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.options import LayerSpec
from diffusers_otq.structure import InputRotation, LowRankBranch
from diffusers_otq.testing.tiny_models import sd3_inputs, tiny_sd3_transformer, tiny_unet, unet_inputs


def _layer(module: nn.Module, spec: LayerSpec) -> OTQLayerMixin:
    fit = fit_data_free(module.weight, spec, "layer")
    target = OTQLinear if isinstance(module, nn.Linear) else OTQConv2d
    return target.from_quantized(fit.quantized, module, fit.lowrank, fit.rotation)


SPECS = {
    "rank": LayerSpec(bits=2, rank=4),
    "rotation": LayerSpec(bits=2, rotation_block=16),
    "both": LayerSpec(bits=2, rank=4, rotation_block=32, granularity="group", group_size=16),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_forward_equals_the_plain_op_with_the_effective_weight(case: str) -> None:
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 24), nn.Conv2d(32, 8, 3, padding=1, stride=2, padding_mode="reflect")
    x, image = torch.randn(5, 64), torch.randn(2, 32, 9, 9)
    qlinear, qconv = _layer(linear, SPECS[case]), _layer(conv, SPECS[case])
    expected = F.linear(x, qlinear.dequantize_weight(), qlinear.bias)
    assert torch.allclose(qlinear(x), expected, atol=1e-5)
    plain = qconv.dequantize()  # a float Conv2d with the effective weight, same padding mode
    assert type(plain) is nn.Conv2d and torch.allclose(qconv(image), plain(image), atol=1e-4)
    assert qlinear.rank == SPECS[case].rank and qlinear.rotation_block == SPECS[case].rotation_block
    assert f"rank={SPECS[case].rank}" in repr(qlinear) or not SPECS[case].rank


def test_rotation_alone_keeps_the_function_before_rounding() -> None:
    """8-bit codes on a rotated weight: the effective weight is the original one up to 8-bit rounding, and the
    forward (which rotates the activations) matches the float layer as closely as without the rotation."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    x = torch.randn(32, 64)
    rotated = _layer(linear, LayerSpec(bits=8, rotation_block=64))
    plain = _layer(linear, LayerSpec(bits=8))
    reference = linear(x)
    assert torch.allclose(rotated(x), reference, atol=5e-3)
    assert (rotated(x) - reference).abs().max() < 4 * (plain(x) - reference).abs().max()
    assert not torch.equal(rotated.codes_weight(), plain.codes_weight())  # the codes really live elsewhere


def test_lowrank_branch_lowers_the_error_and_is_counted() -> None:
    torch.manual_seed(0)
    base = torch.randn(48, 4) @ torch.randn(4, 96) + 0.1 * torch.randn(48, 96)  # a strong rank-4 part
    linear = nn.Linear(96, 48)
    with torch.no_grad():
        linear.weight.copy_(base)
    plain, branched = _layer(linear, LayerSpec(bits=2)), _layer(linear, LayerSpec(bits=2, rank=4))
    error = {
        k: float((m.dequantize_weight() - base).square().sum()) for k, m in (("plain", plain), ("rank", branched))
    }
    assert error["rank"] < 0.25 * error["plain"], error
    assert branched.lowrank_up.dtype == torch.float16 and branched.lowrank_down.shape == (4, 96)
    factor_bytes = 2 * 4 * (48 + 96)
    assert branched.nbytes == plain.nbytes + factor_bytes
    assert branched.bits_per_weight == pytest.approx(plain.bits_per_weight + factor_bytes * 8 / base.numel())


def test_rank_zero_and_no_rotation_reproduce_the_plain_checkpoint() -> None:
    plain, explicit = tiny_unet(), tiny_unet()
    quantize_model(plain, OTQConfig(bits=3), progress=False)
    quantize_model(explicit, OTQConfig(bits=3, rank=0, rotation=False), progress=False)
    a, b = plain.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.rpartition(".")[2].startswith(("lowrank", "rotation")) for k in a)


def test_dtype_cast_keeps_factors_and_signs() -> None:
    layer = _layer(nn.Linear(64, 32), LayerSpec(bits=3, rank=2, rotation_block=64))
    up, signs = layer.lowrank_up.clone(), layer.rotation_signs.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.lowrank_up, up) and layer.lowrank_up.dtype == torch.float16
    assert torch.equal(layer.rotation_signs, signs) and layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == (
        torch.bfloat16
    )


def test_global_rank_skips_small_layers_and_rotation_skips_grouped_convs() -> None:
    config = OTQConfig(bits=2, rank=8, rotation=True)
    assert config.layer_spec("big", nn.Linear(64, 32)).rank == 8
    assert config.layer_spec("small", nn.Linear(12, 32)).rank == 0  # 8 > min(32, 12) // 2
    assert config.layer_spec("odd", nn.Linear(63, 32)).rotation_block == 0
    assert config.layer_spec("wide", nn.Linear(96, 32)).rotation_block == 32
    grouped = config.layer_spec("grouped", nn.Conv2d(8, 8, 3, groups=2))
    assert grouped.rank == 0 and grouped.rotation_block == 0
    capped = OTQConfig(bits=2, rotation=True, rotation_block=16).layer_spec("wide", nn.Linear(96, 32))
    assert capped.rotation_block == 16


@pytest.mark.parametrize(
    ("config", "module", "match"),
    [
        (OTQConfig(module_overrides={"x": {"rank": 40}}), nn.Linear(64, 32), r"rank=40 .*exceeds min\(out, in\)"),
        (OTQConfig(rotation=True, rotation_block=64), nn.Linear(96, 32), "rotation_block=64 does not divide the 96"),
        (OTQConfig(module_overrides={"x": {"rotation": True}}), nn.Conv2d(8, 8, 3, groups=2), "grouped conv"),
    ],
    ids=["rank too large", "block does not divide", "grouped conv"],
)
def test_bad_structure_options_name_the_layer_and_the_fix(config: OTQConfig, module: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config.layer_spec("x", module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rank": -1}, "rank=-1"), ({"rotation": 1}, "rotation=1"), ({"rotation_block": 24}, "rotation_block=24")],
)
def test_bad_config_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OTQConfig(**kwargs)


def test_storage_pieces_validate_their_layout() -> None:
    with pytest.raises(ValueError, match=r"\(out, r\) and \(r, n\)"):
        LowRankBranch(torch.zeros(4, 2), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="packed_signs must be 2 uint8 bytes"):
        InputRotation(torch.zeros(3, dtype=torch.uint8), 16, 16)
    rotation = InputRotation.create(16, 16, seed=3)
    assert torch.equal(rotation.signs(), InputRotation.create(16, 16, seed=3).signs())
    x = torch.randn(4, 16, 5, 5)
    assert torch.allclose(rotation.unrotate(rotation.rotate(x, dim=1), dim=1), x, atol=1e-6)


_RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import diffusers, diffusers_otq
    jobs = json.loads(sys.argv[1])
    outputs = {}
    for job in jobs:
        model = getattr(diffusers, job["class"]).from_pretrained(job["path"])
        with torch.no_grad():
            outputs[job["key"]] = model(**load_file(job["inputs"])).sample.contiguous()
    save_file(outputs, sys.argv[2])
    """
)


def test_structured_checkpoints_reload_bit_identically_in_a_fresh_process(tmp_path: Path) -> None:
    config = OTQConfig(bits=2, rank=4, rotation=True, module_overrides={"conv_in": {"rank": 0}})
    jobs, expected = [], {}
    for name, build, make_inputs in (("unet", tiny_unet, unet_inputs), ("sd3", tiny_sd3_transformer, sd3_inputs)):
        model = build()
        quantize_model(model, config, progress=False)
        layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
        assert any(m.rank for m in layers) and any(m.rotation_block for m in layers)
        inputs = {k: v.contiguous() for k, v in make_inputs().items()}
        save_file(inputs, tmp_path / f"{name}-inputs.safetensors")
        with torch.no_grad():
            expected[name] = expected[f"{name}-sharded"] = model(**inputs).sample
        model.save_pretrained(tmp_path / name)
        model.save_pretrained(tmp_path / f"{name}-sharded", max_shard_size="30KB")
        assert len(list((tmp_path / f"{name}-sharded").glob("*.safetensors"))) > 1
        header = read_safetensors_header(tmp_path / name / "diffusion_pytorch_model.safetensors")
        assert header.metadata["otq_format_version"] == str(FORMAT_VERSION) and any(
            "lowrank_up" in k for k in header.tensors
        )
        for key in (name, f"{name}-sharded"):
            cls = type(model).__name__
            jobs.append({"class": cls, "path": str(tmp_path / key), "inputs": str(tmp_path / f"{name}-inputs.safetensors"),
                         "key": key})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(jobs), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(tmp_path / "out.safetensors")
    for key, value in expected.items():
        assert torch.equal(outputs[key], value), key


@pytest.mark.parametrize("version", [1, 2])
def test_older_checkpoints_still_load(version: int, tmp_path: Path) -> None:
    """Checkpoints written before the structure buffers (format 1) and before the codes were stored as
    ``<layer>.weight`` (formats 1-2, ``<layer>.packed``) load into this version unchanged."""
    model = tiny_sd3_transformer()
    quantize_model(model, OTQConfig(bits=3), progress=False)
    model.save_pretrained(tmp_path / "old")
    file = tmp_path / "old" / "diffusion_pytorch_model.safetensors"
    metadata = read_safetensors_header(file).metadata

    def legacy(key: str) -> str:  # the packed codes' old name
        return key.removesuffix(".weight") + ".packed" if key in packed else key

    tensors = load_file(file)
    packed = {k for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8}
    assert packed and all(k in json.loads(metadata["otq_checksums"]) for k in packed)
    quantized = {k for k in tensors if k.rpartition(".")[0] in {k.rpartition(".")[0] for k in packed}}
    checksums = {legacy(k): tensor_checksum(tensors[k]) for k in quantized if "bias" not in k}  # v1-2: raw bytes
    save_file({legacy(k): v for k, v in tensors.items()}, file,
              metadata={**metadata, "otq_format_version": str(version), "otq_checksums": json.dumps(checksums)})  # fmt: skip
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = version
    if version == 1:
        for key in ("rank", "rotation", "rotation_block", "rotation_seed"):
            config["quantization_config"].pop(key, None)
    config_path.write_text(json.dumps(config))
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "old")
    inputs = sd3_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).sample, model(**inputs).sample)
    old_state = {legacy(k): v for k, v in model.state_dict().items()}  # plain torch state dicts too
    fresh = tiny_sd3_transformer()
    quantize_model(fresh, OTQConfig(bits=3, method="uniform"), progress=False)
    fresh.load_state_dict(old_state)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, model(**inputs).sample)


def test_quantize_on_load_fits_the_same_structure_as_post_hoc(tmp_path: Path) -> None:
    config = OTQConfig(bits=2, rank=4, rotation=True)
    tiny_sd3_transformer().save_pretrained(tmp_path / "float")
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "float", quantization_config=config)
    post_hoc = tiny_sd3_transformer()
    quantize_model(post_hoc, config, progress=False)
    a, b = loaded.state_dict(), post_hoc.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lowrank_up") for k in a) and any(k.endswith("rotation_signs") for k in a)
