"""Refinement: the teacher loss it reports goes down (never up), the format is unchanged, NaN stops it cleanly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_otq import CalibrationConfig, CalibrationError, OTQConfig, quantize_model, quantize_pipeline
from diffusers_otq.calibration import ProbeInputs, TeacherCalls, refine_model
from diffusers_otq.calibration.blocks import block_names, block_outputs
from diffusers_otq.calibration.refine import guided_velocity
from diffusers_otq.calibration.sampling import record_teacher_calls, sampler_guidance
from diffusers_otq.hub import model_card
from diffusers_otq.layers import OTQLayerMixin

from .helpers import dit_pipeline, quick, sample, unet_pipeline


def whole_model(**overrides):
    """The whole-model path this file tests (refine_steps count for the whole model; block-by-block refinement,
    the default, is tested in test_sequential.py)."""
    return quick(sequential=False, **overrides)


def _refined(steps: int = 12, **overrides):
    pipe = unet_pipeline()
    calibration = whole_model(refine_steps=steps, refine_samples=4, refine_batch_size=4, refine_eval_every=4,
                        refine_lr=1e-3, **overrides)  # fmt: skip
    quantize_pipeline(pipe, OTQConfig(bits=2), calibration, progress=False, compute_metrics=False)
    return pipe, pipe.transformer.config["quantization_config"].provenance["refinement"]


def test_refinement_lowers_the_reported_teacher_loss_and_keeps_the_format(tmp_path: Path) -> None:
    pipe, record = _refined()
    assert record["loss_after"] < record["loss_before"] and record["steps"] == 12 and record["stopped"] is None
    layers = [m for m in pipe.transformer.modules() if isinstance(m, OTQLayerMixin)]
    for layer in layers:  # stored exactly as an unrefined checkpoint: 16-bit, ascending codebook rows
        assert layer.codebook.dtype == torch.float16 and not layer.codebook.requires_grad
        assert bool((layer.codebook[:, 1:] >= layer.codebook[:, :-1]).all())
        assert layer.bias is None or layer.bias.grad is None  # no gradient left behind
    plain = unet_pipeline()
    quantize_pipeline(plain, OTQConfig(bits=2), whole_model(), progress=False, compute_metrics=False)
    assert any(not torch.equal(a.codebook, b.codebook) for a, b in zip(
        layers, [m for m in plain.transformer.modules() if isinstance(m, OTQLayerMixin)], strict=True))  # fmt: skip
    images = sample(pipe)
    pipe.save_pretrained(tmp_path / "refined")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import save_file
        from diffusers_otq import FlowMatchPipeline
        torch.set_num_threads(1)  # as the test process (tests/calibration/conftest.py): same kernels, same bits
        from tests.calibration.helpers import sample
        pipe = FlowMatchPipeline.from_pretrained({str(tmp_path / "refined")!r})
        pipe.set_progress_bar_config(disable=True)
        save_file({{"images": sample(pipe).contiguous()}}, {str(tmp_path / "images.safetensors")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path.cwd())
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "images.safetensors")["images"], images)
    saved = json.loads((tmp_path / "refined" / "transformer" / "config.json").read_text())
    assert saved["quantization_config"]["provenance"]["refinement"]["steps"] == 12
    assert saved["quantization_config"]["provenance"]["refinement"]["float_params"] is False  # the default
    assert record["guidance"] == 2.0  # the class pipeline's calibration default: the guided velocity was fitted
    assert "full-precision model's guided velocity (guidance 2.0)" in str(model_card(pipe, tmp_path, "me/fm-otq2"))


@pytest.mark.parametrize("codebook_dtype", [None, "int8"])
def test_refinement_trains_vector_codebooks_and_keeps_their_codes(codebook_dtype: str | None) -> None:
    pipe = dit_pipeline()
    calibration = whole_model(refine_steps=8, refine_samples=4, refine_batch_size=4, refine_eval_every=4,
                              refine_lr=1e-3)  # fmt: skip
    config = OTQConfig(bits=2, vector_dim=2, granularity="group", group_size=16, codebook_dtype=codebook_dtype)
    unrefined = dit_pipeline()
    quantize_pipeline(unrefined, config, whole_model(), progress=False, compute_metrics=False)
    quantize_pipeline(pipe, config, calibration, progress=False, compute_metrics=False)
    record = pipe.transformer.config["quantization_config"].provenance["refinement"]
    assert record["loss_after"] < record["loss_before"]
    pairs = list(zip([m for m in pipe.transformer.modules() if isinstance(m, OTQLayerMixin)],
                     [m for m in unrefined.transformer.modules() if isinstance(m, OTQLayerMixin)], strict=True))  # fmt: skip
    vectors = [(a, b) for a, b in pairs if a.vector_dim == 2]
    assert vectors and all(a.codebook.shape == b.codebook.shape and a.codebook.dim() == 3 for a, b in vectors)
    assert all(torch.equal(a.packed, b.packed) for a, b in vectors)  # codes frozen, codewords never reordered
    assert any(not torch.equal(a.codebook, b.codebook) for a, b in vectors)
    # stored as before refinement: int8 codewords with a (new) float32 scale per codebook, or float16 ones
    expected = torch.int8 if codebook_dtype else torch.float16
    assert all(a.codebook.dtype == expected and a.nbytes == b.nbytes for a, b in pairs)
    assert all((getattr(a, "codebook_scale", None) is not None) == bool(codebook_dtype) for a, _ in pairs)


def test_refinement_is_deterministic_for_a_seed() -> None:
    a, _ = _refined(steps=6)
    b, _ = _refined(steps=6)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_stops_refinement_at_that_step_and_keeps_the_last_good_parameters(monkeypatch) -> None:
    from diffusers_otq.calibration import refine

    calls = {"n": 0}
    original = refine.model_output

    def poisoned(model, args, kwargs):
        out = original(model, args, kwargs)
        if torch.is_grad_enabled():  # training steps only (the reported loss runs without grad)
            calls["n"] += 1
            if calls["n"] == 9:
                return out * float("nan")
        return out

    monkeypatch.setattr(refine, "model_output", poisoned)
    _, record = _refined(steps=12)
    assert record["stopped"] == "non-finite loss at step 9" and record["steps"] == 9
    assert record["loss_after"] <= record["loss_before"] and math.isfinite(record["loss_after"])
    assert record["best_step"] in (0, 4, 8)  # measured every 4 steps: good parameters from before the NaN


def test_refinement_without_a_teacher_is_refused() -> None:
    model = unet_pipeline().transformer
    with pytest.raises(CalibrationError, match="refinement needs a teacher"):
        quantize_model(model, OTQConfig(bits=2), calibration=CalibrationConfig(refine_steps=10), progress=False)
    with pytest.raises(CalibrationError, match="refinement needs a teacher"):
        record_teacher_calls(model, CalibrationConfig(refine_steps=10))
    with pytest.raises(CalibrationError, match="recorded calls with their outputs"):
        TeacherCalls(ProbeInputs(), [])
    with pytest.raises(CalibrationError, match="no OTQ layer"):
        teacher = TeacherCalls.record(model, record_teacher_calls(unet_pipeline(), whole_model(refine_samples=2)))
        refine_model(model, teacher, whole_model(refine_steps=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"refine_steps": -1}, "refine_steps=-1"), ({"refine_lr": 0.0}, "refine_lr=0.0"),
     ({"refine_batch_size": 0}, "refine_batch_size=0"), ({"refine_scope": "layer"}, "refine_scope='layer'")],
)  # fmt: skip
def test_bad_refinement_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        CalibrationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"noise_bands": 0}, "noise_bands=0 must be an int from 1"), ({"noise_bands": 2.0}, "noise_bands=2.0"),
     ({"noise_bands": 2, "sequential": False}, "needs refine_steps > 0"),
     ({"noise_bands": 2, "refine_steps": 5}, "needs sequential=False"),
     ({"noise_bands": 2, "refine_steps": 5, "sequential": False, "refine_scope": "blocks"}, "refine_scope='model'")],
)  # fmt: skip
def test_bad_noise_band_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        CalibrationConfig(**kwargs)


def _bands(pipe, config: OTQConfig, bands: int, **overrides) -> list[OTQLayerMixin]:
    calibration = whole_model(refine_steps=12, refine_samples=4, refine_batch_size=4, refine_eval_every=4,
                              refine_lr=1e-3, noise_bands=bands, **overrides)  # fmt: skip
    quantize_pipeline(pipe, config, calibration, progress=False, compute_metrics=False)
    return [m for m in pipe.transformer.modules() if isinstance(m, OTQLayerMixin)]


@pytest.mark.parametrize("codebook_dtype", [None, "int8"])
def test_noise_bands_refine_each_bands_codebooks_over_the_same_codes(codebook_dtype: str | None) -> None:
    config = OTQConfig(bits=2, codebook_dtype=codebook_dtype)
    one, two = _bands(unet_pipeline(), config, 1), _bands(pipe := unet_pipeline(), config, 2)
    saved = pipe.transformer.config["quantization_config"]
    record = saved.provenance["refinement"]
    assert record["noise_bands"] == 2 and record["loss_after"] < record["loss_before"]
    assert record["steps"] == 2 * 12  # refine_steps per band
    calls = record_teacher_calls(unet_pipeline(), whole_model(refine_samples=4))
    timesteps = sorted({float(args[1].reshape(-1)[0]) for args, _ in calls.calls})
    assert len(saved.noise_band_edges) == 1 and timesteps[0] < saved.noise_band_edges[0] < timesteps[-1]
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a.packed, b.packed)  # the codes are the fit's, shared by both bands
        rows = a.codebook.shape[0]
        assert b.codebook.shape == (2 * rows, *a.codebook.shape[1:]) and b.codebook.dtype == a.codebook.dtype
        assert b.nbytes - a.nbytes == a.codebook.numel() * a.codebook.element_size() + (
            4 * rows if codebook_dtype else 0
        )
        assert bool((b.codebook[:rows, 1:] >= b.codebook[:rows, :-1]).all())  # band 0 ascending, as stored before
    assert any(not torch.equal(b.codebook[: a.codebook.shape[0]], b.codebook[a.codebook.shape[0] :])
               for a, b in zip(one, two, strict=True))  # fmt: skip


def test_a_bits_budget_counts_every_bands_codebooks() -> None:
    pipe = dit_pipeline()
    layers = _bands(pipe, OTQConfig(bits_per_weight=2.5), 2)
    stored = sum(m.nbytes * 8 for m in layers) / sum(m.weight_shape.numel() for m in layers)
    assert all(m.noise_bands == 2 for m in layers) and 2.3 < stored <= 2.5
    saved = pipe.transformer.config["quantization_config"]
    assert saved.provenance["bits_per_weight"]["reached"] == pytest.approx(stored, abs=1e-3)


def test_noise_band_edges_are_calibrations_output_not_its_input() -> None:
    with pytest.raises(ValueError, match="is written by calibration, not an input"):
        _bands(unet_pipeline(), OTQConfig(bits=2, noise_band_edges=[500.0]), 2)


@pytest.mark.parametrize("pipeline", [unet_pipeline, dit_pipeline])
def test_block_by_block_refinement_trains_every_block_and_never_raises_the_loss(pipeline, tmp_path: Path) -> None:
    pipe = pipeline()
    calibration = whole_model(refine_steps=6, refine_samples=4, refine_batch_size=4, refine_eval_every=3,
                        refine_lr=1e-3, refine_scope="blocks")  # fmt: skip
    quantize_pipeline(pipe, OTQConfig(bits=2), calibration, progress=False, compute_metrics=False)
    record = pipe.transformer.config["quantization_config"].provenance["refinement"]
    names = block_names(pipe.transformer)
    layer_names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, OTQLayerMixin)]
    blocks = [b for b in names if any(n == b or n.startswith(b + ".") for n in layer_names)]
    assert record["scope"] == "blocks" and record["blocks"] == len(blocks) > 1 and record["best_step"] is None
    assert record["steps"] == 6 * len(blocks) and record["stopped"] is None
    assert record["loss_after"] < record["loss_before"]
    for layer in (m for m in pipe.transformer.modules() if isinstance(m, OTQLayerMixin)):
        assert not layer.codebook.requires_grad and bool((layer.codebook[:, 1:] >= layer.codebook[:, :-1]).all())
    assert f"block outputs, {len(blocks)} blocks one at a time" in str(model_card(pipe, tmp_path, "me/fm-otq2"))


def test_block_calls_hold_each_blocks_full_precision_inputs_and_outputs() -> None:
    pipe = unet_pipeline()
    model = pipe.transformer
    calls = record_teacher_calls(pipe, whole_model(refine_samples=2))
    teacher = TeacherCalls.record(model, calls, blocks=True)
    assert list(teacher.blocks) == block_names(model) and "down_blocks.0" in teacher.blocks
    recorded = teacher.blocks["down_blocks.0"]
    assert len(recorded) == len(calls)
    args, kwargs = recorded.calls[0]
    with torch.no_grad():  # replaying a recorded call reproduces the recorded output exactly
        again = block_outputs(model.down_blocks[0](*args, **kwargs))
    assert all(torch.equal(a.float(), b) for a, b in zip(again, recorded.outputs[0], strict=True))
    with pytest.raises(CalibrationError, match="needs the teacher's block calls"):
        quantize_model(model, OTQConfig(bits=2), calibration=whole_model(refine_steps=2, refine_scope="blocks"),
                       teacher=TeacherCalls.record(unet_pipeline().transformer, calls), progress=False)  # fmt: skip


def test_the_teacher_of_a_guided_sampler_pairs_each_conditional_row_with_its_null_twin() -> None:
    pipe = unet_pipeline()
    assert sampler_guidance(pipe, whole_model()) == 2.0  # the class pipelines' calibration default
    assert sampler_guidance(pipe, whole_model(guidance_scale=3.5)) == 3.5
    assert sampler_guidance(pipe, whole_model(guidance_scale=1.0)) is None  # one conditional pass per step
    assert sampler_guidance(pipe.transformer, whole_model()) is None  # a bare model has no sampler
    teacher = TeacherCalls.from_pipeline(pipe, whole_model(refine_samples=2))
    assert teacher.guidance == 2.0 and len(teacher.outputs) == 3  # 3 Euler steps
    for (args, kwargs), out in zip(teacher.inputs.calls, teacher.outputs, strict=True):
        labels = kwargs["class_labels"]
        assert out.shape[0] == 4 and bool((labels[2:] == pipe.num_classes).all())  # 2 samples + 2 null twins
        assert bool((labels[:2] != pipe.num_classes).all())
        assert torch.equal(args[0][:2], args[0][2:])  # the same latents
    unguided = TeacherCalls.from_pipeline(pipe, whole_model(refine_samples=2, guidance_scale=1.0))
    assert unguided.guidance is None and unguided.outputs[0].shape[0] == 2
    with pytest.raises(CalibrationError, match=r"guidance=2.0 pairs .* odd batch"):
        TeacherCalls(unguided.inputs, [torch.zeros(3, 1, 4, 4)] * len(unguided.outputs), guidance=2.0)


def test_guided_refinement_fits_the_velocity_the_sampler_steps_with(monkeypatch) -> None:
    from diffusers_otq.calibration import refine

    pipe = unet_pipeline()
    teacher = TeacherCalls.from_pipeline(pipe, whole_model(refine_samples=4))
    model = pipe.transformer
    quantize_model(model, OTQConfig(bits=2), calibration=whole_model(), progress=False, compute_metrics=False)
    num = den = 0.0
    with torch.no_grad():  # the reported loss, by hand: the guided velocity's relative error over every call
        for (args, kwargs), ref in zip(teacher.inputs.calls, teacher.outputs, strict=True):
            out = guided_velocity(model(*args, **kwargs).sample.double(), 2.0)
            target = guided_velocity(ref.double(), 2.0)
            num, den = num + float((out - target).square().sum()), den + float(target.square().sum())
    assert refine._loss(model, teacher) == pytest.approx(num / den, rel=1e-6)
    seen = []
    original = refine.model_output

    def spy(model, args, kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs["class_labels"].clone())
        return original(model, args, kwargs)

    monkeypatch.setattr(refine, "model_output", spy)
    report = refine_model(model, teacher, whole_model(refine_steps=4, refine_batch_size=4, refine_eval_every=2,
                                                      refine_lr=1e-3))  # fmt: skip
    assert report.loss_after < report.loss_before and len(seen) == 4
    for labels in seen:  # each training step: 2 conditional rows, then their 2 null-class twins
        assert labels.shape == (4,) and bool((labels[2:] == pipe.num_classes).all())
        assert bool((labels[:2] != pipe.num_classes).all())


def _dit_with_teacher():
    pipe = dit_pipeline()
    teacher = TeacherCalls.from_pipeline(pipe, whole_model(refine_samples=4))
    model = pipe.transformer
    quantize_model(model, OTQConfig(bits=2), calibration=whole_model(), progress=False, compute_metrics=False)
    model.requires_grad_(False)  # as after loading for inference
    return model, teacher


@pytest.mark.parametrize("train_floats", [False, True])
def test_refinement_trains_the_float_parameters_outside_the_quantized_layers_only_when_asked(train_floats) -> None:
    model, teacher = _dit_with_teacher()
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if "embedding_table" in n}
    assert tables and not any(isinstance(model.get_submodule(n.rpartition(".")[0]), OTQLayerMixin) for n in tables)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    calibration = whole_model(refine_steps=6, refine_batch_size=4, refine_eval_every=3, refine_lr=1e-3,
                              refine_float_params=train_floats)  # fmt: skip
    report = refine_model(model, teacher, calibration)
    assert report.loss_after < report.loss_before and report.best_step > 0
    params = dict(model.named_parameters())
    moved = [not torch.equal(params[n], before) for n, before in tables.items()]
    assert all(moved) if train_floats else not any(moved)  # the class embeddings move only when asked
    assert any(not torch.equal(params[n], before) for n, before in biases.items())  # biases train either way
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())  # flags as they were


def test_a_refinement_that_storage_undoes_puts_every_parameter_back(monkeypatch) -> None:
    from diffusers_otq.calibration import refine

    model, teacher = _dit_with_teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = refine._store

    def spoiled(layer, dtypes):  # storage that ruins the codebooks: the stored model is worse than the unrefined
        original(layer, dtypes)
        layer._buffers["codebook"] = layer._buffers["codebook"] * 3

    monkeypatch.setattr(refine, "_store", spoiled)
    report = refine_model(model, teacher, whole_model(refine_steps=4, refine_batch_size=4, refine_eval_every=2,
                                                      refine_lr=1e-3, refine_float_params=True))  # fmt: skip
    assert report.loss_after == report.loss_before and report.best_step == 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # codebooks, biases and embedding tables


def test_the_block_by_block_path_refuses_band_edges_too() -> None:
    with pytest.raises(ValueError, match="is written by calibration, not an input"):
        quantize_pipeline(unet_pipeline(), OTQConfig(bits=2, noise_band_edges=[500.0]), quick(), progress=False)
