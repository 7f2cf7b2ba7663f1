"""The work folder of a block-by-block run (:mod:`.sequential`): what a rerun needs to resume after the last
finished block.

Files, each written under a temporary name and renamed, so an interruption leaves the previous state intact:

* ``run.json``: the run's fingerprint (model class, layers and shapes, config, calibration settings, block order,
  calls, processes). A folder holding another fingerprint is refused, with the differing fields named.
* ``plan.json``: a bits budget's plan (every layer's chosen setting), made once before any fit.
* ``block-NNNN.safetensors`` and ``block-NNNN.json``: the stored tensors of the layers block ``NNNN`` converted,
  and their names.
* ``progress.json``: how many blocks are finished, the plan's choices and layer reports so far, the refinement
  record.
* ``streams-NNNN.safetensors`` (``streams-rR-NNNN`` per process): the cached activations still needed after block
  ``NNNN``.
* ``spill/``: activations above ``max_activation_bytes``.

Only safetensors and JSON are read back, never pickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..options import LayerSpec
from .allocation import LayerChoice
from .config import CalibrationError
from .processes import barrier


__all__ = ["Progress", "WorkFolder"]

FORMAT = 1
"""Version of the folder's layout, part of the fingerprint (a folder of another layout is refused)."""


@dataclass
class Progress:
    """What ``progress.json`` records after each finished block."""

    done: int
    choices: list[LayerChoice]
    reports: list[dict[str, Any]]
    refinement: dict[str, Any] | None


class WorkFolder:
    """The files of one run in ``path``, for process ``rank`` of ``world`` (rank 0 writes the shared files)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0, world: int = 1) -> None:
        self.path = Path(path)
        self.rank, self.world = rank, world

    @property
    def spill(self) -> Path:
        """Where activations above the memory budget go."""
        return self.path / "spill"

    # ------------------------------------------------------------------------------------------------ the plan

    def plan(self) -> list[LayerChoice] | None:
        """The bits budget's plan saved by an earlier run, or None."""
        saved = self.path / "plan.json"
        if not saved.exists():
            return None
        return [_choice_from_dict(c) for c in json.loads(saved.read_text())["choices"]]

    def save_plan(self, choices: list[LayerChoice]) -> None:
        """Keep the plan (rank 0 writes it)."""
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json(self.path / "plan.json", {"choices": [_choice_to_dict(c) for c in choices]})

    # ---------------------------------------------------------------------------------------- the progress

    def open(self, fingerprint: dict[str, Any]) -> Progress | None:
        """Start a run with ``fingerprint``: None for a fresh folder (its fingerprint written), else the progress
        of the run it holds.

        Raises:
            CalibrationError: the folder holds another run (another model, config or calibration settings).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fingerprint = {"format": FORMAT, **fingerprint}
        progress_file = self.path / "progress.json"
        if not progress_file.exists():
            if self.rank == 0:
                _write_json(self.path / "run.json", fingerprint)
            barrier(self.world)
            return None
        saved = json.loads((self.path / "run.json").read_text())
        if saved != fingerprint:
            differs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise CalibrationError(
                f"the work folder {self.path} holds another run (its {', '.join(differs)} differ); resume with the "
                "same model, config and calibration settings, or pass another work_dir (or delete that folder)."
            )
        state = json.loads(progress_file.read_text())
        choices = [_choice_from_dict(c) for c in state["choices"]]
        return Progress(int(state["done"]), choices, state["reports"], state["refinement"])

    def block(self, position: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The stored tensors of finished block ``position`` (keys ``"<layer>.<tensor>"``) and its layer names."""
        tensors = load_file(str(self.path / f"block-{position:04d}.safetensors"))
        names = json.loads((self.path / f"block-{position:04d}.json").read_text())["layers"]
        return tensors, names

    def finish_block(
        self, position: int, block: str, layers: dict[str, dict[str, torch.Tensor]], progress: Progress
    ) -> None:
        """Record finished block ``position``: its layers' stored tensors (by layer name), then the progress
        (rank 0 writes; the caller synchronises the processes around it)."""
        if self.rank != 0:
            return
        tensors = {f"{name}.{key}": value for name, stored in layers.items() for key, value in stored.items()}
        temporary = self.path / f"block-{position:04d}.tmp"
        save_file(tensors, str(temporary))
        os.replace(temporary, self.path / f"block-{position:04d}.safetensors")
        _write_json(self.path / f"block-{position:04d}.json", {"block": block, "layers": list(layers)})
        state = {
            "done": progress.done,
            "choices": [_choice_to_dict(c) for c in progress.choices],
            "reports": progress.reports,
            "refinement": progress.refinement,
        }
        _write_json(self.path / "progress.json", state)

    def streams(self, position: int) -> Path:
        """This process's file of the activations still needed after block ``position``."""
        name = f"streams-{position:04d}" if self.world == 1 else f"streams-r{self.rank}-{position:04d}"
        return self.path / f"{name}.safetensors"


def _choice_to_dict(choice: LayerChoice) -> dict[str, Any]:
    spec = json.loads(json.dumps(asdict(choice.spec), default=str))
    return {"name": choice.name, "numel": choice.numel, "nbytes": choice.nbytes,
            "relative_error": choice.relative_error, "distortion": choice.distortion, "fixed": choice.fixed,
            "spec": spec}  # fmt: skip


def _choice_from_dict(data: dict[str, Any]) -> LayerChoice:
    spec = dict(data["spec"])
    dtype = spec.get("codebook_dtype")
    spec["codebook_dtype"] = None if dtype in (None, "None") else getattr(torch, str(dtype).removeprefix("torch."))
    return LayerChoice(data["name"], LayerSpec(**spec), data["numel"], data["nbytes"], data["relative_error"],
                       data["distortion"], data["fixed"])  # fmt: skip


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)
