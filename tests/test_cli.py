"""The diffusers-otq command on tiny real pipelines: demo, quantize, generate, and its errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusers_otq import METHODS, FlowMatchPipeline
from diffusers_otq.cli import main
from diffusers_otq.evaluation.classifier import FashionClassifier, save_classifier
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_sd3_transformer, tiny_unet

from .test_pipeline import conditional_unet, make_pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundled-style pipeline folder with reference.json and a classifier next to it."""
    root = tmp_path_factory.mktemp("bundle")
    make_pipeline(conditional_unet()).save_pretrained(root / "tiny")
    info = {"name": "otq/tiny", "dataset": "tinyset", "classes": [str(i) for i in range(10)]}
    (root / "tiny" / "reference.json").write_text(json.dumps(info))
    torch.manual_seed(0)
    save_classifier(FashionClassifier(image_size=8, num_stages=2), root / "classifiers" / "tinyset", test_accuracy=0.5)
    return root / "tiny"


def test_demo_writes_grids_plot_and_table(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["demo", "--models", str(bundle), "--budgets", "2.5", "3", "--refine-steps", "2", "--peers", "hqq-3"]
    args += ["--calibration-samples", "4", "--num-images", "4", "--steps", "2", "--output", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0]  # every variant, then the summary by width
    rows = {line.split(" | ")[1].strip("* "): line for line in table.splitlines() if line.startswith("| tiny |")}
    expected = ["float32", "data-free ot-vp 2-bit", "data-free ot-vp 3-bit", "data-free ot-vp 4-bit", "OTQ 2.5 b/w",
                "OTQ 3 b/w", "HQQ 3-bit g64"]  # fmt: skip
    assert list(rows) == expected
    for budget in ("2.5", "3"):  # the budget is met, every stored bit counted
        assert float(rows[f"OTQ {budget} b/w"].split(" | ")[2]) <= float(budget)
    assert "%" in rows["OTQ 3 b/w"]  # class agreement and accuracy from the bundled classifier
    assert "Shortened for a quick run: compared samples 4 (full: 64)" in out
    assert "| **OTQ calibrated + budget + refined** |" in out  # the summary by width
    written = (tmp_path / "demo_table.md").read_text()
    assert "| tiny | **OTQ 2.5 b/w** |" in written and "![demo_rd.png](demo_rd.png)" in written
    grid = Image.open(tmp_path / "demo_grid_tiny.png")
    assert grid.height >= 7 * 8 * 3  # seven rows of 8x8 images scaled 3x
    assert Image.open(tmp_path / "demo_rd.png").width > 400
    cached = list((tmp_path / "cache").glob("*-statistics.safetensors"))
    assert len(cached) == 1  # a second run reuses the calibration statistics
    before = cached[0].stat().st_mtime_ns
    assert main([*args[:-2], "--peers", "--output", str(tmp_path)]) == 0
    assert cached[0].stat().st_mtime_ns == before


def test_quantize_pipeline_and_reload(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(bundle), str(tmp_path / "q"), "--bits", "3"]) == 0
    out = capsys.readouterr().out
    assert "bits/weight of quantized layers" in out and "size on disk" in out and "mean W2" in out
    pipe = FlowMatchPipeline.from_pretrained(tmp_path / "q")
    assert any(isinstance(m, OTQLayerMixin) for m in pipe.transformer.modules())


def test_quantize_with_calibration_and_a_bits_budget(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stats = tmp_path / "stats.safetensors"
    argv = ["quantize", str(bundle), str(tmp_path / "q"), "--bits-per-weight", "3", "--calibrate", "--num-samples", "4",
            "--calibration-steps", "2", "--save-statistics", str(stats)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "calibration: 1 batches (class_labels)" in out and "bits budget 3.0: reached" in out
    pipe = FlowMatchPipeline.from_pretrained(tmp_path / "q")
    config = pipe.transformer.config.quantization_config
    assert config.provenance["bits_per_weight"]["budget"] == 3.0 and config.module_overrides
    # The saved statistics quantize again without sampling, to the same checkpoint.
    assert (
        main(["quantize", str(bundle), str(tmp_path / "again"), "--bits-per-weight", "3", "--statistics", str(stats)])
        == 0
    )
    from safetensors.torch import load_file

    first = load_file(tmp_path / "q" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert "refinement" not in config.provenance
    second = load_file(tmp_path / "again" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_quantize_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_sd3_transformer().save_pretrained(tmp_path / "sd3")
    assert (
        main(
            [
                "quantize",
                str(tmp_path / "sd3"),
                str(tmp_path / "q"),
                "--bits",
                "4",
                "--granularity",
                "group",
                "--group-size",
                "8",
                "--vector-dim",
                "2",
            ]
        )
        == 0
    )
    assert "'group'" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["granularity"] == "group"
    assert config["quantization_config"]["vector_dim"] == 2


def test_generate_writes_pngs(bundle: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "generate",
                str(bundle),
                "--num-images",
                "3",
                "--class-labels",
                "1",
                "--steps",
                "2",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "grid.png",
        "sample_0000.png",
        "sample_0001.png",
        "sample_0002.png",
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["demo", "--models", "otq/does-not-exist"],
            r"'otq/does-not-exist' is not a bundled reference pipeline; available",
        ),
        (["demo", "--peers", "hqq-7"], r"--peers \['hqq-7'\] are not peer formats; choose from"),
        (["demo", "--budgets", "0"], r"--budgets \[0.0\] must be bits/weight in \(0, 16\]"),
        (["demo", "--num-images", "0"], r"--num-images 0 must be >= 1"),
        (["generate", "{bundle}", "--class-labels", "12", "--steps", "2"], r"class_labels \[12\] are out of range"),
        (["generate", "{bundle}", "--steps", "0"], r"--steps 0 must be >= 1"),
        (["generate", "{bundle}", "--class-labels", "-1"], r"--class-labels \[-1\] must be class indices >= 0"),
        (["quantize", "{tmp}", "{tmp}/out"], r"is not a diffusers model or pipeline folder"),
        (["quantize", "{bundle}", "{tmp}/out", "--bits", "9"], r"bits=9 is out of range"),
        (["quantize", "{bundle}", "{tmp}/out", "--prompts", "p.txt"], r"--prompts only apply with --calibrate"),
        (["quantize", "{bundle}", "{tmp}/out", "--refine-steps", "5"], r"--refine-steps only apply with --calibrate"),
        (["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--refine-blocks"], r"add --refine-steps N"),
        (["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--refine-float-params"], r"add --refine-steps N"),
        (["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--noise-bands", "2"], r"add --refine-steps N"),
        (
            ["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--refine-steps", "2", "--noise-bands", "0"],
            r"noise_bands=0 must be an int from 1",
        ),
        (["quantize", "{bundle}", "{tmp}/out", "--rank", "-2"], r"rank=-2 must be an int >= 0"),
        (["quantize", "{bundle}", "{tmp}/out", "--rotate", "--rotation-block", "24"], r"rotation_block=24 must be"),
        (
            ["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--prompts", "{tmp}/none.txt"],
            r"cannot read --prompts",
        ),
        (["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--prompts", "{tmp}/file.txt"], r"takes no prompts"),
        (["quantize", "{bundle}", "{tmp}/out", "--calibrate", "--num-samples", "0"], r"empty calibration set"),
        (["quantize", "{bundle}", "{tmp}/out", "--statistics", "{tmp}/none.st"], r"statistics file .* does not exist"),
        (["quantize", "{bundle}", "{tmp}/out", "--bits-per-weight", "0.2"], r"below what this model can reach"),
        (["quantize", "{bundle}/transformer", "{tmp}/out", "--calibrate"], r"single model folder"),
        (["generate", "{bundle}", "--output", "{tmp}/file.txt/sub"], r"cannot write to output folder"),
    ],
)
def test_errors_are_one_clear_line(
    argv: list[str], message: str, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    argv = [a.format(bundle=bundle, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_console_script_is_installed_and_quiet() -> None:
    executable = shutil.which("diffusers-otq") or str(Path(sys.executable).parent / "diffusers-otq")
    result = subprocess.run([executable, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("diffusers-otq ")
    assert result.stderr == ""  # no import noise from the optional backends diffusers loads (torchao, bnb)


def test_a_bad_choice_is_one_line_naming_the_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "a", "b", "--method", "nope"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "diffusers-otq quantize: error: argument --method: invalid choice: 'nope' (choose from "
        + ", ".join(repr(m) for m in METHODS)
        + "). See diffusers-otq quantize --help."
    ]


def test_generate_cycles_class_labels(bundle: Path, tmp_path: Path) -> None:
    argv = ["generate", str(bundle), "--num-images", "5", "--class-labels", "0", "1", "--steps", "2",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[-1] == "sample_0004.png"


def test_a_failed_command_leaves_no_empty_output_folder(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "samples"
    argv = ["generate", str(bundle), "--class-labels", "12", "--steps", "2", "--output", str(out)]
    assert main(argv) == 2  # fails after loading the pipeline, where the folder already existed
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert main([*argv[:-1], str(tmp_path / "kept")]) == 2 and (tmp_path / "kept").is_dir()  # not ours to remove


def test_quantize_with_structure_and_refinement(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["quantize", str(bundle), str(tmp_path / "q"), "--bits", "2", "--rank", "2", "--rotate", "--calibrate",
            "--num-samples", "2", "--calibration-steps", "2", "--refine-steps", "3", "--no-error-feedback",
            "--refine-float-params"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks one at a time):" in out and "mean block error" in out  # block by block: 3 steps per block
    pipe = FlowMatchPipeline.from_pretrained(tmp_path / "q")
    provenance = pipe.transformer.config["quantization_config"].provenance
    assert provenance["refinement"]["float_params"] is True and provenance["calibration"]["refine_float_params"]
    layers = [m for m in pipe.transformer.modules() if hasattr(m, "rank")]
    assert any(m.rank == 2 for m in layers) and any(m.rotation_block for m in layers)
    from diffusers_otq.hub import model_card

    card = str(model_card(pipe, tmp_path / "q", "me/fm-dit-otq2"))
    assert (
        "refinement (codes frozen) | 3 Adam steps" in card and "per block" in card and "rank-2 16-bit branch" in card
    )
    assert "block by block" in card
    assert "randomized Hadamard input rotation" in card


def test_quantize_with_noise_bands_saves_each_bands_codebooks(bundle: Path, tmp_path: Path) -> None:
    argv = ["quantize", str(bundle), str(tmp_path / "q"), "--bits", "2", "--calibrate", "--num-samples", "2",
            "--calibration-steps", "3", "--refine-steps", "3", "--noise-bands", "2"]  # fmt: skip
    assert main(argv) == 0
    pipe = FlowMatchPipeline.from_pretrained(tmp_path / "q")
    config = pipe.transformer.config["quantization_config"]
    assert len(config.noise_band_edges) == 1 and config.provenance["refinement"]["noise_bands"] == 2
    assert config.provenance["refinement"]["steps"] == 2 * 3  # --refine-steps per band
    assert config.provenance["calibration"]["sequential"] is False  # bands train the whole model at once
    layers = [m for m in pipe.transformer.modules() if hasattr(m, "noise_bands")]
    assert layers and {m.noise_bands for m in layers} == {2}
    from diffusers_otq.hub import model_card

    assert "2 sets of codebooks, one per noise-level band" in str(model_card(pipe, tmp_path / "q", "me/fm-otq2"))


def test_quantize_refuses_to_overwrite_its_source_or_a_non_model_class(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "utils"}))
    assert main(["quantize", str(folder), str(tmp_path / "out")]) == 2
    assert "names 'utils', which is not a diffusers model class" in capsys.readouterr().err
    before = sorted(p.name for p in folder.iterdir())
    for out in (folder, folder / "q"):
        assert main(["quantize", str(folder), str(out)]) == 2
        assert "would overwrite the float model" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_quantize_refuses_weights_that_do_not_fit_the_config_class(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_unet().save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"  # builds, but these weights are not its weights
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["quantize", str(tmp_path / "unet"), str(tmp_path / "out"), "--bits", "3"]) == 2
    err = capsys.readouterr().err
    assert "the weights do not fit UNet2DConditionModel" in err and "unexpected keys" in err
    assert not (tmp_path / "out").exists()
