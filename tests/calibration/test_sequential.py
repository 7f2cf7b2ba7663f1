"""Block-by-block calibration (diffusers_otq.calibration.sequential) on real tiny diffusers models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from diffusers_otq import CalibrationConfig, OTQConfig, quantize_model
from diffusers_otq.calibration import CalibrationError
from diffusers_otq.calibration.activations import ActivationStore
from diffusers_otq.calibration.sampling import calibration_batches
from diffusers_otq.calibration.trace import External, Output, trace_blocks
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_flux_transformer, tiny_sd3_transformer, tiny_unet


def _sd3_call(model: nn.Module, generator: torch.Generator, t: int) -> torch.Tensor:
    return model(
        hidden_states=torch.randn(2, 4, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=generator),
        pooled_projections=torch.randn(2, 64, generator=generator),
        timestep=torch.tensor([t, t]),
    ).sample


def _unet_call(model: nn.Module, generator: torch.Generator, t: int) -> torch.Tensor:
    return model(torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([t, t])).sample


def _flux_call(model: nn.Module, generator: torch.Generator, t: int) -> torch.Tensor:
    return model(
        hidden_states=torch.randn(2, 16, 4, generator=generator),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=generator),
        pooled_projections=torch.randn(2, 32, generator=generator),
        timestep=torch.tensor([t / 1000, t / 1000]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    ).sample


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
    "sd3": (lambda: tiny_sd3_transformer(num_layers=3), _sd3_call),
    "unet": (tiny_unet, _unet_call),
    "flux": (tiny_flux_transformer, _flux_call),
}


def _forward_fn(model: nn.Module, call: Callable, offset: int = 0) -> Callable[[int], None]:
    """Batch ``b``: three denoiser calls at decreasing timesteps on inputs seeded by ``b``."""

    def forward(batch: int) -> None:
        generator = torch.Generator().manual_seed(offset + batch)
        for t in (900, 500, 100):
            call(model, generator, t)

    return forward


def _calibrated(kind: str, **settings) -> nn.Module:
    build, call = MODELS[kind]
    model = build()
    settings = {"num_batches": 2, "progress": False, **settings}
    config = settings.pop("config", OTQConfig(bits=3))
    quantize_model(model, config, calibration=CalibrationConfig(forward_fn=_forward_fn(model, call), **settings),
                   progress=False)  # fmt: skip
    return model


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, OTQLayerMixin):
            out.update({f"{name}.{k}": v for k, v in module.stored_tensors().items()})
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach()
    return out


def _assert_same_codes(a: nn.Module, b: nn.Module) -> None:
    left, right = _stored(a), _stored(b)
    assert left.keys() == right.keys() and left
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} stored tensors differ, e.g. {different[:3]}"


def _velocity_error(model: nn.Module, reference: nn.Module, call: Callable) -> float:
    """Relative velocity error over held-out calls (other seeds than calibration)."""
    num = den = 0.0
    with torch.no_grad():
        for seed in (100, 101):
            for t in (800, 300):
                out = call(model, torch.Generator().manual_seed(seed), t)
                ref = call(reference, torch.Generator().manual_seed(seed), t)
                num, den = num + float((out - ref).square().sum()), den + float(ref.square().sum())
    return num / den


def test_the_trace_links_block_outputs_to_the_blocks_that_read_them() -> None:
    model = tiny_unet()
    store = ActivationStore(1 << 30)
    forward = _forward_fn(model, _unet_call)
    trace = trace_blocks(model, forward, [0], store, lambda args, kwargs: (1.0, ""))
    assert len(trace.calls) == 3 and trace.order.index("conv_in") < trace.order.index("down_blocks.0")
    first = trace.calls[0]
    by_block = {inv.block: inv for inv in first.invocations}
    # the up block reads the down blocks' skip tensors and the time embedding: all linked, none copied
    up = by_block["up_blocks.0"]
    linked = {first.invocations[leaf.invocation].block for leaf in up.leaves if isinstance(leaf, Output)}
    assert {"mid_block", "time_embedding"} <= linked and any(name.startswith("down_blocks") for name in linked)
    # conv_in reads the denoiser's input: an external, stored once per call
    assert all(isinstance(leaf, External) for leaf in by_block["conv_in"].leaves if not isinstance(leaf, int | None))
    assert trace.external_bytes() > 0


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_float_block_inputs_give_exactly_the_whole_model_fit(kind: str) -> None:
    """Each block replayed on the float model's inputs sees exactly what the whole-model statistics saw: same
    sums in the same order, so the same codes, codebooks and biases, bit for bit."""
    _assert_same_codes(_calibrated(kind, block_inputs="float"), _calibrated(kind, sequential=False))


def test_a_budget_is_planned_over_the_whole_model_as_the_whole_model_path_plans_it() -> None:
    """The first pass measures every block's candidates and allocates once: the same plan and codes as the
    whole-model allocator (a per-block share of the budget would starve the sensitive blocks)."""
    budget = OTQConfig(bits_per_weight=2.5)
    sequential = _calibrated("sd3", config=budget)
    _assert_same_codes(sequential, _calibrated("sd3", config=budget, sequential=False))
    reached = sequential.config.quantization_config.provenance["bits_per_weight"]["reached"]
    assert 2.4 < reached <= 2.5


def test_quantized_block_inputs_beat_data_free_and_differ_from_float_inputs() -> None:
    build, call = MODELS["sd3"]
    reference = build()
    quantized = _calibrated("sd3", block_inputs="quantized")
    data_free = build()
    quantize_model(data_free, OTQConfig(bits=3), progress=False)
    with pytest.raises(AssertionError):
        _assert_same_codes(quantized, _calibrated("sd3", block_inputs="float"))
    assert _velocity_error(quantized, reference, call) < 0.8 * _velocity_error(data_free, reference, call)


def test_spilled_activations_give_the_same_codes(tmp_path: Path) -> None:
    """Quantized block inputs: the spilled activations are the quantized blocks' outputs, read back exactly."""
    spilled = _calibrated("unet", block_inputs="quantized", max_activation_bytes=1, work_dir=tmp_path / "work")
    assert any((tmp_path / "work").glob("block-*.safetensors"))
    _assert_same_codes(spilled, _calibrated("unet", block_inputs="quantized"))


def test_refinement_per_block_is_recorded_and_never_raises_a_block_error() -> None:
    model = _calibrated("sd3", refine_steps=20, refine_eval_every=5, refine_batch_size=2)
    record = model.config.quantization_config.provenance["refinement"]
    assert record["scope"] == "sequential blocks" and record["steps_per_block"] == 20 and record["blocks"] >= 3
    assert record["loss_after"] <= record["loss_before"] and record["steps"] == 20 * record["blocks"]
    calibration = model.config.quantization_config.provenance["calibration"]
    assert calibration["sequential"] is True and calibration["block_inputs"] == "float"


def test_the_sequential_model_saves_and_reloads_bit_identically(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    model = _calibrated("sd3")
    model.save_pretrained(tmp_path / "q")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    _assert_same_codes(model, reloaded)
    with torch.no_grad():
        first = _sd3_call(model, torch.Generator().manual_seed(5), 400)
        assert torch.equal(first, _sd3_call(reloaded, torch.Generator().manual_seed(5), 400))


def test_a_work_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _calibrated("unet", work_dir=work)
    with pytest.raises(CalibrationError, match="holds another run .*config"):
        _calibrated("unet", work_dir=work, config=OTQConfig(bits=2))


_SCRIPT = """
import os, sys, torch
from diffusers_otq import CalibrationConfig, OTQConfig, quantize_model
from tests.calibration.test_sequential import MODELS, _forward_fn
torch.set_num_threads(1)
work, out, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
build, call = MODELS["sd3"]
model = build()
calibration = CalibrationConfig(forward_fn=_forward_fn(model, call), num_batches=3, refine_steps=40,
                                refine_eval_every=10, refine_batch_size=2, work_dir=None if work == "none" else work,
                                progress=False)
config = OTQConfig(bits=3) if budget == 0 else OTQConfig(bits_per_weight=budget)
quantize_model(model, config, calibration=calibration, progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    model.save_pretrained(out)
"""
REPO = Path(__file__).resolve().parents[2]


def _quantize_in_subprocess(work: Path | str, out: Path, budget: float = 0.0, processes: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _SCRIPT]
    if processes > 1:
        script = out.parent / "quantize.py"
        script.write_text(_SCRIPT)
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]  # fmt: skip
    return subprocess.Popen([*command, str(work), str(out), str(budget)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _same_files(a: Path, b: Path) -> None:
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_run_killed_midway_resumes_to_a_byte_identical_model(tmp_path: Path) -> None:
    reference = _quantize_in_subprocess(tmp_path / "work-a", tmp_path / "a")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    interrupted = _quantize_in_subprocess(tmp_path / "work-b", tmp_path / "b")
    progress = tmp_path / "work-b" / "progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and interrupted.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["done"] >= 3:
            break
        time.sleep(0.02)
    assert interrupted.poll() is None, "the run ended before it could be interrupted"
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    done = json.loads(progress.read_text())["done"]
    blocks = len(json.loads((tmp_path / "work-b" / "run.json").read_text())["blocks"])
    assert 3 <= done < blocks

    resumed = _quantize_in_subprocess(tmp_path / "work-b", tmp_path / "b")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    _same_files(tmp_path / "a", tmp_path / "b")


def test_two_processes_give_the_same_bytes_as_one(tmp_path: Path) -> None:
    """Batches, statistics sums, layer fits, candidate measurements and refinement steps are split across two
    processes (accelerate launch); the saved model is the one-process model, byte for byte."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the accelerate launcher is not installed next to this python")
    one = _quantize_in_subprocess("none", tmp_path / "one", budget=2.5)
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]
    two = _quantize_in_subprocess("none", tmp_path / "two", budget=2.5, processes=2)
    assert two.wait(timeout=600) == 0, two.stderr.read()[-3000:]
    _same_files(tmp_path / "one", tmp_path / "two")


def test_calibration_batches_of_a_bare_model_need_a_forward_fn() -> None:
    with pytest.raises(CalibrationError, match="forward_fn"):
        calibration_batches(tiny_unet(), CalibrationConfig())
