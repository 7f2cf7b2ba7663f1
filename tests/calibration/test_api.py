"""quantize_pipeline / quantize_model with calibration: end to end, saved and reloaded in fresh processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusers_otq
from diffusers_otq import CalibrationStatistics, FlowMatchPipeline, OTQConfig, calibrate, quantize_pipeline
from diffusers_otq.layers import OTQLayerMixin
from tests.calibration.helpers import quick, sample, unet_pipeline


REPO = Path(__file__).resolve().parents[2]

_RELOAD = textwrap.dedent(
    """
    import sys, torch
    import diffusers_otq
    from diffusers_otq import FlowMatchPipeline
    from safetensors.torch import save_file
    torch.set_num_threads(1)  # as the test process (tests/calibration/conftest.py): same kernels, same bits
    pipe = FlowMatchPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    save_file({"images": images.contiguous()}, sys.argv[2])
    """
)


def test_calibrated_pipeline_saves_and_reloads_bit_identically(tmp_path: Path) -> None:
    pipe = unet_pipeline()
    reference = sample(pipe)
    reports = quantize_pipeline(pipe, OTQConfig(bits_per_weight=3.0), quick(), progress=False)
    assert len(reports) == sum(isinstance(m, OTQLayerMixin) for m in pipe.transformer.modules()) > 0
    images = sample(pipe)
    assert torch.isfinite(images).all() and not torch.equal(images, reference)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "images.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "pipe"), str(out)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(out)["images"], images)
    # The saved config carries the plan; the model card says what produced it.
    reloaded = FlowMatchPipeline.from_pretrained(tmp_path / "pipe")
    config = reloaded.transformer.config.quantization_config
    assert config.bits_per_weight is None and config.module_overrides and config.provenance["calibration"]


def test_calibrated_fit_beats_data_free_on_the_samples() -> None:
    pipe = unet_pipeline()
    reference = sample(pipe)
    data_free = unet_pipeline()
    quantize_pipeline(data_free, OTQConfig(bits=2), progress=False)
    calibrated = unet_pipeline()
    quantize_pipeline(calibrated, OTQConfig(bits=2), quick(), progress=False)

    def mse(images: torch.Tensor) -> float:
        return float((images - reference).square().mean())

    assert mse(sample(calibrated)) < mse(sample(data_free))


def test_saved_statistics_give_the_same_quantization(tmp_path: Path) -> None:
    pipe = unet_pipeline()
    stats = calibrate(pipe, OTQConfig(bits=3), quick())
    stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStatistics.load(tmp_path / "stats.safetensors")
    first, second = unet_pipeline(), unet_pipeline()
    quantize_pipeline(first, OTQConfig(bits_per_weight=2.5), statistics=stats, calibration=quick(), progress=False)
    quantize_pipeline(second, OTQConfig(bits_per_weight=2.5), statistics=loaded, calibration=quick(), progress=False)
    state, again = first.transformer.state_dict(), second.transformer.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


_DISTRIBUTED = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from diffusers_otq import OTQConfig, calibrate, quantize_model
    from tests.calibration.helpers import quick, unet_pipeline
    pipe = unet_pipeline()
    stats = calibrate(pipe, OTQConfig(bits=3), quick(num_samples=10, batch_size=2))
    quantize_model(pipe.transformer, OTQConfig(bits_per_weight=2.5), statistics=stats, calibration=quick(),
                   progress=False)
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    if rank == 0:
        stats.save(sys.argv[1] + ".stats.safetensors")
        pipe.transformer.save_pretrained(sys.argv[1])
    """
)


def test_statistics_are_identical_for_one_and_two_processes(tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed next to this python")
    script = tmp_path / "calibrate.py"
    script.write_text(_DISTRIBUTED)
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1"}
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), str(REPO)], capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "two"), str(REPO)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = CalibrationStatistics.load(tmp_path / "one.stats.safetensors")
    b = CalibrationStatistics.load(tmp_path / "two.stats.safetensors")
    assert a.info["processes"] == 1 and b.info["processes"] == 2
    for name in a:
        for x, y in zip(a[name].tensors(), b[name].tensors(), strict=True):
            assert torch.equal(x, y), name
    for path in (tmp_path / "one").glob("*.safetensors"):
        left, right = load_file(path), load_file(tmp_path / "two" / path.name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_public_exports() -> None:
    for name in ("CalibrationConfig", "CalibrationStatistics", "calibrate", "quantize_pipeline", "plan_bits"):
        assert name in diffusers_otq.__all__
