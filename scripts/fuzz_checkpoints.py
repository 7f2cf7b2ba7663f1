#!/usr/bin/env python
"""Long seeded fuzzing campaigns on saved OTQ checkpoints (see diffusers_otq.testing.fuzzing for the mutation kinds).

Every damaged checkpoint must either load with outputs identical to the original's or raise CheckpointError;
"silent" (loaded, different outputs) and "raw" (any other exception) are failures, listed in the report.

    python scripts/fuzz_checkpoints.py --mutations 10000 --output results/reliability.md
    python scripts/fuzz_checkpoints.py --cases unet-sharded --mutations 500 --seed 3       # quick look
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffusers_otq.testing.fuzz_cases import CASES, make_probe, saved_checkpoint
from diffusers_otq.testing.fuzzing import count_table, run_campaign


logger = logging.getLogger("fuzz_checkpoints")
IDENTICAL_NOTE = (
    "An identical outcome is a mutation that changed nothing the model reads: an edit to the same value (a 1-D shape "
    "rewritten as itself, a character replaced by itself), a swap of two equal tensors (two all-ones norm weights), "
    "a metadata key diffusers-otq does not read (diffusers' 'format'), a quantization_config field set to the value "
    "it had, to its default or to one that only matters when fitting (method), a config.json field the config "
    "checksums do not cover (_name_or_path), or a sharded index entry the loader does not need (it reads every shard "
    "the index names)."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--mutations", type=int, default=10_000, help="per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    lines = [
        "# Checkpoint fuzzing: every damaged checkpoint loads identically or is refused",
        "",
        f"Command: `python scripts/fuzz_checkpoints.py {' '.join(sys.argv[1:])}`",
        "",
        "Classes: identical = loaded, outputs equal to the original's bit for bit; refused = CheckpointError with "
        "the cause; silent = loaded with different outputs (a failure); raw = any other exception (a failure). "
        "Models: the tests' tiny diffusers UNet2DModel and SD3Transformer2DModel and transformers T5EncoderModel and "
        "CLIPTextModel at 3 bits, each loaded with its own class's from_pretrained "
        f"(diffusers_otq/testing/fuzz_cases.py); {args.mutations} mutations per case, the kinds taken in turn.",
        "",
        IDENTICAL_NOTE,
    ]
    failures = 0
    for case in args.cases:
        fuzz_case = CASES[case]
        with tempfile.TemporaryDirectory() as tmp:
            diffusers_logging.set_verbosity_error()
            source = saved_checkpoint(Path(tmp), fuzz_case)
            probe = make_probe(fuzz_case, source)
            names = [name for name, _ in fuzz_case.build().named_modules() if name]
            logging.disable(logging.WARNING)
            start = time.perf_counter()
            outcomes = run_campaign(source, probe, args.mutations, args.seed, names, Path(tmp))
            seconds = time.perf_counter() - start
            logging.disable(logging.NOTSET)
        bad = [o for o in outcomes if o.result in ("silent", "raw")]
        failures += len(bad)
        lines += ["", f"## {case}: {len(outcomes)} mutations, seed {args.seed}, {seconds:.0f} s", ""]
        lines += count_table(outcomes)
        if bad:
            lines += ["", "Failures:", ""] + [f"- {o.kind}: {o.detail} -> **{o.result}** {o.error}" for o in bad[:50]]
        examples = {o.kind: o for o in outcomes if o.result == "refused"}
        lines += ["", "One refusal per kind (the first line of the error):", ""]
        lines += [f"- {kind}: {o.detail} -> `{o.error[:160]}`" for kind, o in examples.items()]
        logger.info("%s: %d mutations, %d failures, %.0f s", case, len(outcomes), len(bad), seconds)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
