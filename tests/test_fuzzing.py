"""Seeded fuzzing of saved checkpoints: each damaged checkpoint loads with identical outputs or raises
CheckpointError; nothing loads with different outputs, nothing raises another exception.

520 mutations per run (about 30 s); scripts/fuzz_checkpoints.py runs the long campaigns (results/reliability.md)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from diffusers_otq import OTQConfig
from diffusers_otq.fuzzing import MUTATIONS, Outcome, Probe, count_table, mutate, run_campaign

from .tiny_models import sd3_inputs, tiny_sd3_transformer, tiny_unet, unet_inputs


CASES = {  # name -> (model builder, model class, inputs builder, save_pretrained kwargs, mutations)
    "unet-single-file": (tiny_unet, UNet2DModel, unet_inputs, {}, 320),
    "unet-sharded": (tiny_unet, UNet2DModel, unet_inputs, {"max_shard_size": "20KB"}, 100),
    "sd3-single-file": (tiny_sd3_transformer, SD3Transformer2DModel, sd3_inputs, {}, 100),
}


@pytest.fixture(autouse=True)
def _quiet_loading() -> Iterator[None]:
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    diffusers_logging.set_verbosity(level)


def saved_checkpoint(tmp_path: Path, build: Callable, cls: type, save_kwargs: dict) -> Path:
    """``build()`` saved in float, quantized on load at 3 bits and saved again under ``tmp_path / "quantized"``."""
    build().save_pretrained(tmp_path / "float")
    cls.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(bits=3)).save_pretrained(
        tmp_path / "quantized", **save_kwargs
    )
    return tmp_path / "quantized"


def make_probe(cls: type, inputs: dict, source: Path) -> Probe:
    """Load with ``cls.from_pretrained`` and run ``inputs``; the expected output is that of ``source``."""

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    def load(folder: Path) -> torch.nn.Module:
        return cls.from_pretrained(folder)

    with torch.no_grad():
        return Probe(load, run, run(load(source)))


def _failures(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if o.result in ("silent", "raw")]
    return "\n".join([*count_table(outcomes), *(f"{o.kind}: {o.detail} -> {o.result} {o.error}" for o in bad[:20])])


@pytest.mark.parametrize("case", list(CASES))
def test_every_mutation_loads_identically_or_is_refused(tmp_path: Path, case: str) -> None:
    build, cls, make_inputs, save_kwargs, count = CASES[case]
    source = saved_checkpoint(tmp_path, build, cls, save_kwargs)
    probe = make_probe(cls, make_inputs(), source)
    names = [name for name, _ in build().named_modules() if name]
    outcomes = run_campaign(source, probe, count, seed=sorted(CASES).index(case), module_names=names, workdir=tmp_path)
    assert len(outcomes) == count
    assert all(o.result in ("identical", "refused") for o in outcomes), _failures(outcomes)
    refused = sum(o.result == "refused" for o in outcomes)
    assert refused >= 0.6 * count, _failures(outcomes)  # the damage is real: most mutations must be caught


def test_mutations_are_reproducible_and_really_change_the_files(tmp_path: Path) -> None:
    source = saved_checkpoint(tmp_path, tiny_unet, UNet2DModel, {})
    names = [name for name, _ in tiny_unet().named_modules() if name]
    original = {p.name: p.read_bytes() for p in source.iterdir()}
    for kind in MUTATIONS:
        details, contents = [], []
        for _ in range(2):
            details.append(mutate(source, tmp_path / "m", kind, random.Random(11), names))
            contents.append({p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()})
        assert details[0] == details[1] and contents[0] == contents[1], kind
        if kind != "index":  # a single-file checkpoint has no index; the kind falls back to a file mutation
            assert contents[0] != original or "no quantization_config" in details[0], kind
