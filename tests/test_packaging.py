"""What a user installs: the wheel and the sdist, built from the source tree and installed with no path back to it.

An editable install finds every folder of the source tree, so a subpackage the build leaves out goes unnoticed
there. These tests build the wheel (and a second wheel from the sdist, as ``pip install <sdist>`` does), check
that it holds every file of ``diffusers_otq/``, install it into a fresh virtual environment whose only view of
the test environment is its third-party packages, and use it there as a user would: import every module, run
``diffusers-otq --version``, quantize a bundled model with calibration, save it and reload it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import diffusers_otq


REPO = Path(__file__).resolve().parent.parent
PACKAGE = "diffusers_otq"


def _run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result.stdout


def _source_files(repo: Path) -> list[str]:
    """The repository's files as a fresh clone would have them (tracked, plus new files git does not ignore)."""
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], repo)
    return sorted(name for name in listed.split("\0") if name and (repo / name).is_file())


def _package_files(files: list[str]) -> set[str]:
    return {f for f in files if f.startswith(f"{PACKAGE}/") and "__pycache__" not in f}


def _build(kind: str, source: Path, out: Path) -> Path:
    """``build_wheel``/``build_sdist`` of the PEP 517 backend, as pip calls it (no build isolation: setuptools
    comes from the test environment, so the test needs no network)."""
    code = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, str(out)], source).strip().splitlines()[-1]
    return out / name


def _copy_source(tree: Path) -> Path:
    for name in _source_files(REPO):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from a copy of the source tree, the sdist, and a wheel built from the unpacked sdist."""
    root = tmp_path_factory.mktemp("packaging")
    tree, dist = _copy_source(root / "tree"), root / "dist"
    dist.mkdir()
    wheel = _build("wheel", tree, dist)
    sdist = _build("sdist", tree, dist)
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (from_sdist := root / "from-sdist").mkdir()
    unpacked = next((root / "unpacked").iterdir())
    return {"tree": tree, "wheel": wheel, "sdist": sdist, "sdist_wheel": _build("wheel", unpacked, from_sdist)}


def _wheel_files(wheel: Path) -> set[str]:
    return {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith(f"{PACKAGE}/")}


@pytest.mark.parametrize("which", ["wheel", "sdist_wheel"])
def test_the_wheel_holds_every_file_of_the_package(built: dict[str, Path], which: str) -> None:
    source = _package_files(_source_files(REPO))
    shipped = _wheel_files(built[which])
    missing = sorted(source - shipped)
    assert not missing, f"{built[which].name} ({which}) lacks {len(missing)} files of the source tree: {missing[:20]}"
    assert not sorted(shipped - source), f"{which} holds files that are not in the source tree"
    packages = {str(Path(f).parent) for f in source if f.endswith("/__init__.py")}
    assert {"diffusers_otq/calibration", "diffusers_otq/functional", "diffusers_otq/evaluation"} <= packages


def test_a_subpackage_left_out_of_the_build_is_caught(tmp_path: Path) -> None:
    """The check above fails, naming the files, when a build leaves a subpackage out (its __init__.py gone)."""
    tree = _copy_source(tmp_path / "tree")
    (tree / PACKAGE / "calibration" / "__init__.py").unlink()  # package discovery no longer sees the folder
    (tmp_path / "dist").mkdir()
    shipped = _wheel_files(_build("wheel", tree, tmp_path / "dist"))
    missing = _package_files(_source_files(REPO)) - shipped
    assert "diffusers_otq/calibration/__init__.py" in missing and "diffusers_otq/calibration/api.py" in missing


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(python), "-c", code], python.parent).strip())


@pytest.fixture(scope="module")
def installed(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed by pip (console script included). Its only link to
    the test environment is a ``.pth`` line naming the test environment's site-packages, so torch and diffusers
    import; that folder holds no copy of diffusers_otq (an editable install keeps only a finder there, which a
    ``.pth`` path line does not run)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    lines = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (_site_packages(python) / "test-environment.pth").write_text("\n".join(sorted(lines)) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(built["wheel"])],
        venv.parent,
    )  # fmt: skip
    return venv


def _run_installed(venv: Path, code: str, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return _run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd, timeout, env)


def test_the_installed_wheel_imports_every_module_from_its_own_files(installed: Path, tmp_path: Path) -> None:
    expected = sorted(
        f[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for f in _package_files(_source_files(REPO))
        if f.endswith(".py")
    )
    code = """
        import importlib, json, pkgutil, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # the moved modules' aliases warn on import
        import diffusers_otq
        names = ["diffusers_otq"] + [m.name for m in pkgutil.walk_packages(diffusers_otq.__path__, "diffusers_otq.")]
        files = {name: importlib.import_module(name).__file__ for name in names}
        finders = [type(f).__name__ for f in sys.meta_path if "editable" in type(f).__name__.lower()]
        print(json.dumps({"files": files, "path": sys.path, "finders": finders,
                          "models": diffusers_otq.reference_models()}))
    """
    report = json.loads(_run_installed(installed, code, tmp_path).strip().splitlines()[-1])
    site = str(_site_packages(installed / "bin" / "python"))
    assert sorted(report["files"]) == expected
    outside = {name: file for name, file in report["files"].items() if not file.startswith(site)}
    assert not outside, f"modules imported from outside the installed wheel: {outside}"
    assert str(REPO) not in report["path"] and str(REPO / PACKAGE) not in report["path"]
    assert not report["finders"]
    assert report["models"] == ["otq/fashion-mnist-dit", "otq/fashion-mnist-unet"]


def test_the_installed_command_quantizes_with_calibration_saves_and_reloads(installed: Path, tmp_path: Path) -> None:
    command = installed / "bin" / "diffusers-otq"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    version = _run([str(command), "--version"], tmp_path, env=env)
    assert version.strip() == f"diffusers-otq {diffusers_otq.__version__}"
    out = tmp_path / "dit-otq3"
    _run(
        [str(command), "quantize", "otq/fashion-mnist-dit", str(out), "--bits", "3", "--calibrate",
         "--num-samples", "8", "--calibration-steps", "4"],
        tmp_path, env=env,
    )  # fmt: skip
    code = f"""
        import json, torch
        from diffusers_otq import FlowMatchPipeline, OTQLinear
        pipe = FlowMatchPipeline.from_pretrained({str(out)!r})
        layers = [m for m in pipe.transformer.modules() if isinstance(m, OTQLinear)]
        images = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=4, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        config = pipe.transformer.config.quantization_config
        print(json.dumps({{"layers": len(layers), "bits": sorted({{m.bits for m in layers}}),
                          "calibrated": "calibration" in (config.provenance or {{}}),
                          "finite": bool(torch.isfinite(images).all()), "shape": list(images.shape)}}))
    """
    report = json.loads(_run_installed(installed, code, tmp_path).strip().splitlines()[-1])
    assert report["layers"] > 0 and report["bits"] == [3]
    assert report["calibrated"], "the saved config does not record the calibration"
    assert report["finite"] and report["shape"][0] == 2
