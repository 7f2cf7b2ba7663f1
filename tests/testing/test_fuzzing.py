"""Seeded fuzzing of saved checkpoints: each damaged checkpoint loads with identical outputs or raises
CheckpointError; nothing loads with different outputs, nothing raises another exception.

Diffusers denoisers and transformers text encoders, 820 mutations per run (the 300 of the text encoders add about
8 s: most are refused before transformers reads a weight); scripts/fuzz_checkpoints.py runs the long campaigns
(results/reliability.md)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffusers_otq.testing.fuzz_cases import CASES, make_probe, saved_checkpoint
from diffusers_otq.testing.fuzzing import MUTATIONS, Outcome, count_table, mutate, run_campaign


@pytest.fixture(autouse=True)
def _quiet_loading() -> Iterator[None]:
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    transformers_logging.enable_progress_bar()
    diffusers_logging.set_verbosity(levels[0])
    transformers_logging.set_verbosity(levels[1])


def _failures(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if o.result in ("silent", "raw")]
    return "\n".join([*count_table(outcomes), *(f"{o.kind}: {o.detail} -> {o.result} {o.error}" for o in bad[:20])])


@pytest.mark.parametrize("case", list(CASES))
def test_every_mutation_loads_identically_or_is_refused(tmp_path: Path, case: str) -> None:
    fuzz_case = CASES[case]
    source = saved_checkpoint(tmp_path, fuzz_case)
    probe = make_probe(fuzz_case, source)
    names = [name for name, _ in fuzz_case.build().named_modules() if name]
    count = fuzz_case.mutations
    outcomes = run_campaign(source, probe, count, seed=sorted(CASES).index(case), module_names=names, workdir=tmp_path)
    assert len(outcomes) == count
    assert all(o.result in ("identical", "refused") for o in outcomes), _failures(outcomes)
    refused = sum(o.result == "refused" for o in outcomes)
    assert refused >= 0.6 * count, _failures(outcomes)  # the damage is real: most mutations must be caught
    # config.json is part of the checkpoint: only quantization_config edits that change nothing loaded (a default,
    # the fitting method) and an added _name_or_path (not covered) may load; every model field edit is refused
    loaded = [o.detail for o in outcomes if o.kind == "config" and o.result == "identical"]
    assert all(d.startswith(("quantization_config", "no quantization_config", "_name_or_path")) for d in loaded), (
        loaded
    )


def test_mutations_are_reproducible_and_really_change_the_files(tmp_path: Path) -> None:
    source = saved_checkpoint(tmp_path, CASES["unet-single-file"])
    names = [name for name, _ in CASES["unet-single-file"].build().named_modules() if name]
    original = {p.name: p.read_bytes() for p in source.iterdir()}
    for kind in MUTATIONS:
        details, contents = [], []
        for _ in range(2):
            details.append(mutate(source, tmp_path / "m", kind, random.Random(11), names))
            contents.append({p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()})
        assert details[0] == details[1] and contents[0] == contents[1], kind
        if kind != "index":  # a single-file checkpoint has no index; the kind falls back to a file mutation
            assert contents[0] != original or "no quantization_config" in details[0], kind
