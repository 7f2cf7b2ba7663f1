"""Seeded fuzzing of saved checkpoints: each damaged checkpoint loads with identical outputs or raises
CheckpointError; nothing loads with different outputs, nothing raises another exception.

520 mutations per run (about 30 s); scripts/fuzz_checkpoints.py runs the long campaigns (results/reliability.md)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging

from diffusers_otq.testing.fuzz_cases import CASES, make_probe, saved_checkpoint
from diffusers_otq.testing.fuzzing import MUTATIONS, Outcome, count_table, mutate, run_campaign


@pytest.fixture(autouse=True)
def _quiet_loading() -> Iterator[None]:
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)
    diffusers_logging.set_verbosity(level)


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
