"""Codebooks per noise-level band: storage, band edges, the timestep router, save and reload with bands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from diffusers_otq import OTQConfig, quantize_tensor
from diffusers_otq.convert import plan_layers, replace_with_empty_layers, set_submodule
from diffusers_otq.layers import OTQLayerMixin, OTQLinear
from diffusers_otq.noise_bands import (
    band_edges,
    band_index,
    call_timesteps,
    check_band_edges,
    install_noise_band_router,
    remove_noise_band_router,
    set_noise_band,
)
from diffusers_otq.options import LayerSpec
from diffusers_otq.quantized_tensor import QuantizedTensor, storage_layout
from diffusers_otq.testing.tiny_models import tiny_dit


def test_band_edges_split_the_distinct_timesteps_into_runs_of_equal_length() -> None:
    steps = [1000.0, 933.3, 866.7, 800.0, 733.3, 666.7]
    assert band_edges(steps + steps, 2) == [pytest.approx(833.35)]  # repeated calls count once
    edges = band_edges(steps, 3)
    assert [band_index(torch.tensor([t]), edges) for t in sorted(steps)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="as many distinct timesteps"):
        band_edges([500.0, 500.0], 2)
    with pytest.raises(ValueError, match="noise_bands=17"):
        band_edges(steps, 17)


def test_band_index_puts_an_edge_in_the_upper_band_and_refuses_calls_across_an_edge() -> None:
    assert band_index(torch.tensor([499.0, 499.0]), [500.0]) == 0
    assert band_index(torch.tensor([500.0]), [500.0]) == 1
    with pytest.raises(ValueError, match="across the noise-band edges"):
        band_index(torch.tensor([10.0, 900.0]), [500.0])


def test_call_timesteps_reads_the_keyword_or_the_second_positional_argument() -> None:
    assert call_timesteps((torch.zeros(2), torch.tensor([3, 3])), {}).tolist() == [3.0, 3.0]
    assert call_timesteps((torch.zeros(2),), {"timestep": 7.5}).tolist() == [7.5]
    assert call_timesteps((torch.zeros(2),), {}) is None
    assert call_timesteps((torch.zeros(2), torch.tensor([True])), {}) is None


@pytest.mark.parametrize("edges", [[], [2.0, 1.0], [1.0, 1.0], [float("nan")], "500", [True], list(range(16))])
def test_bad_band_edges_are_refused_naming_the_value(edges: object) -> None:
    with pytest.raises(ValueError, match="noise_band_edges=.*strictly ascending"):
        check_band_edges(edges)
    with pytest.raises(ValueError, match="noise_band_edges"):
        OTQConfig(noise_band_edges=edges)


@pytest.mark.parametrize("codebook_dtype", [None, torch.int8])
def test_bands_stack_codebooks_over_shared_codes_and_count_every_band(codebook_dtype: torch.dtype | None) -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    single = quantize_tensor(weight, bits=2, codebook_dtype=codebook_dtype)
    banded = single.with_noise_bands(3)
    assert banded.codebook.shape == (3 * 16, 4) and torch.equal(banded.packed, single.packed)
    extra = single.codebook.numel() * single.codebook.element_size()
    extra += 0 if single.codebook_scale is None else single.codebook_scale.numel() * 4
    assert banded.nbytes == single.nbytes + 2 * extra  # two more sets, every byte counted
    layout = storage_layout((16, 32), LayerSpec(bits=2, noise_bands=3, codebook_dtype=codebook_dtype),
                            banded.codebook.dtype)  # fmt: skip
    assert {name: shape for name, (shape, _) in layout.items()} == {
        n: tuple(t.shape) for n, t in banded.tensors().items()
    }
    assert torch.equal(banded.dequantize(), single.dequantize())  # every band starts as the fitted one
    banded.codebook[16:32] = banded.codebook[16:32] * 2  # band 1's codebooks
    if banded.codebook_scale is not None:
        banded.codebook[16:32] = banded.codebook[:16]
        banded.codebook_scale[16:32] = banded.codebook_scale[:16] * 2
    doubled = QuantizedTensor(**{**banded.__dict__, "noise_band": 1})
    assert torch.allclose(doubled.dequantize(), 2 * single.dequantize())
    assert torch.equal(QuantizedTensor(**{**banded.__dict__, "noise_band": 2}).dequantize(), single.dequantize())
    with pytest.raises(IndexError, match="noise_band=3 is out of range"):
        QuantizedTensor(**{**banded.__dict__, "noise_band": 3}).dequantize()
    with pytest.raises(ValueError, match="already has 3 noise bands"):
        banded.with_noise_bands(2)


def _banded_dit(edges: list[float]) -> DiTTransformer2DModel:
    """A tiny DiT quantized at 2 bits with one set of codebooks per band, band ``b``'s codewords scaled by
    ``1 + b / 2`` (as if refined apart) and the router installed."""
    model = tiny_dit(num_layers=1)
    for layer in plan_layers(model, OTQConfig(bits=2).layer_spec):
        quantized = quantize_tensor(layer.module.weight, bits=2).with_noise_bands(len(edges) + 1)
        per_band = quantized.codebook.shape[0] // quantized.noise_bands
        for band in range(quantized.noise_bands):
            quantized.codebook[band * per_band : (band + 1) * per_band] *= 1 + band / 2
        set_submodule(model, layer.name, layer.target.from_quantized(quantized, layer.module))
    install_noise_band_router(model, edges)
    return model


def _dit_inputs(timestep: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 1, 8, 8, generator=g), "timestep": torch.tensor([timestep] * 2),
            "class_labels": torch.tensor([1, 2])}  # fmt: skip


@torch.no_grad()
def test_the_router_decodes_the_codebooks_of_each_calls_band() -> None:
    model = _banded_dit([400.0, 700.0])
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    outputs = {}
    for timestep, band in ((100.0, 0), (500.0, 1), (900.0, 2)):
        outputs[band] = model(**_dit_inputs(timestep)).sample
        assert {m.noise_band for m in layers} == {band}
    assert "noise_bands=3" in repr(layers[0])
    assert remove_noise_band_router(model) and not remove_noise_band_router(model)
    set_noise_band(model, 0)  # by hand, without the router: band 0's codebooks at a timestep of band 2
    assert not torch.equal(model(**_dit_inputs(900.0)).sample, outputs[2])
    set_noise_band(model, 2)
    assert torch.equal(model(**_dit_inputs(900.0)).sample, outputs[2])
    install_noise_band_router(model, [400.0, 700.0])
    set_noise_band(model, 0)
    assert torch.equal(model(**_dit_inputs(900.0)).sample, outputs[2])  # the router picks band 2 again
    with pytest.raises(ValueError, match="across the noise-band edges"):
        model(**{**_dit_inputs(0.0), "timestep": torch.tensor([100.0, 900.0])})
    with pytest.raises(IndexError, match="noise band 3 does not exist"):
        set_noise_band(model, 3)
    with pytest.raises(ValueError, match=r"make 2 bands, but OTQ layers .* hold \[3\]"):
        install_noise_band_router(model, [500.0])


def test_a_call_without_a_timestep_is_refused_naming_the_fix() -> None:
    model = _banded_dit([500.0])
    linear = next(m for m in model.modules() if isinstance(m, OTQLinear))
    install_noise_band_router(linear, [500.0])
    with pytest.raises(ValueError, match="passes none .* set_noise_band"):
        linear(torch.randn(2, linear.in_features))


_RELOAD_AND_RUN = """
import sys, torch
import diffusers_otq
from diffusers import DiTTransformer2DModel
model = DiTTransformer2DModel.from_pretrained(sys.argv[1])
out = {}
with torch.no_grad():
    for t in (100.0, 500.0, 900.0):
        g = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([t, t]),
                      class_labels=torch.tensor([1, 2]))
        out[str(t)] = model(**inputs).sample
torch.save(out, sys.argv[2])
"""


def test_banded_checkpoints_save_as_format_7_and_reload_routed_in_a_fresh_process(tmp_path: Path) -> None:
    from diffusers_otq.calibration.api import _convert_model  # the layer conversion calibration uses

    model = tiny_dit(num_layers=1)
    config = OTQConfig(bits=2, codebook_dtype="int8", noise_band_edges=[400.0, 700.0])
    _convert_model(model, config, progress=False, compute_metrics=False)
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    for layer in layers:  # make the bands differ, as refinement would
        per_band = layer.codebook_scale.shape[0] // 3
        layer.codebook_scale[per_band:] *= torch.linspace(1.2, 1.5, 2 * per_band)
    install_noise_band_router(model, config.noise_band_edges)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["noise_band_edges"] == [400.0, 700.0] and saved["format_version"] == 7
    out = tmp_path / "out.pt"
    result = subprocess.run([sys.executable, "-c", _RELOAD_AND_RUN, str(tmp_path / "q"), str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(out, weights_only=True)
    with torch.no_grad():
        for t in (100.0, 500.0, 900.0):
            assert torch.equal(reloaded[str(t)], model(**_dit_inputs(t)).sample)
    assert not torch.equal(reloaded["100.0"], reloaded["900.0"])
    # the skeleton a checkpoint with edges loads into stores every band
    skeleton = tiny_dit(num_layers=1)
    replace_with_empty_layers(skeleton, plan_layers(skeleton, config.layer_spec))
    empty = [m for m in skeleton.modules() if isinstance(m, OTQLayerMixin)]
    assert [m.codebook.shape for m in empty] == [m.codebook.shape for m in layers]


def test_quantize_on_load_refuses_band_edges(tmp_path: Path) -> None:
    tiny_dit(num_layers=1).save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="only refinement .* CalibrationConfig\\(noise_bands=2"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(
            bits=2, noise_band_edges=[500.0]))  # fmt: skip


@torch.no_grad()
def test_a_dequantized_model_keeps_the_active_bands_weights_and_runs_without_a_timestep() -> None:
    from diffusers_otq.convert import dequantize_model

    model = _banded_dit([500.0])
    routed = model(**_dit_inputs(900.0)).sample  # band 1 is now active
    dequantize_model(model)
    assert not any(isinstance(m, OTQLayerMixin) for m in model.modules())
    assert torch.allclose(model(**_dit_inputs(900.0)).sample, routed, atol=1e-5)
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    banded = nn.Sequential(OTQLinear(quantize_tensor(weight, bits=2).with_noise_bands(2)))
    install_noise_band_router(banded, [500.0])
    with pytest.raises(ValueError, match="passes none"):
        banded(torch.randn(2, 8))
    dequantize_model(banded)  # the router stays registered, with nothing left to route
    assert banded(torch.randn(2, 8)).shape == (2, 4)
