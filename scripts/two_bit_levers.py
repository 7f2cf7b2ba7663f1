"""One lever of the two-bit study at a time on a bundled model (results/two-bit.md, section 3).

Quantizes the bundled model under a bits budget with calibration (the whole-model path), optionally refined,
optionally without vector-codebook candidates or with ``module_overrides`` pinning some layers, then samples 64
images (labels cycled, seed 0; the pipeline's defaults, 30 steps without guidance, or ``--protocol``: the evaluation's
15 steps with guidance 2.0, calibration and teacher at the same sampler) and prints one JSON line: bits per weight
(every stored byte), sample PSNR and class agreement (both judges) against the float model's samples from the same
noise, and the quantization time.

    python scripts/two_bit_levers.py --budget 2.0                       # vector candidates, no refinement
    python scripts/two_bit_levers.py --budget 2.0 --no-vectors          # the allocator's scalar candidates only
    python scripts/two_bit_levers.py --budget 2.0 --refine-steps 600
    python scripts/two_bit_levers.py --budget 2.0 --overrides '{"*norm1.linear": {"bits": 3, "granularity": "channel", "group_size": null}}'
    python scripts/two_bit_levers.py --protocol --refine-steps 600                    # guided refinement, the defaults
    python scripts/two_bit_levers.py --protocol --refine-steps 300 --refine-batch-size 16 --refine-lr 1e-4 --per-branch
                                                                          # the defaults before (each branch's velocity)
    python scripts/two_bit_levers.py --protocol --refine-steps 600 --bands 2      # codebooks per noise band
    python scripts/two_bit_levers.py --protocol --refine-steps 1200 --refine-samples 128 --refine-eval-every 600
                                                                          # a teacher of 128 trajectories

``--bands N`` is ``CalibrationConfig(noise_bands=N)``: codebooks per noise-level band over shared codes
(:mod:`diffusers_otq.noise_bands`), every band's codebooks counted in the bits and in the budget. (The simulated
bands of results/two-bit.md section 3e, one refined model copy per band, came from this script at commit 1cb4d7f.)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

import diffusers_otq.calibration.allocation as allocation
from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig, calibrate, quantize_model
from diffusers_otq.calibration import TeacherCalls
from diffusers_otq.evaluation.classifier import reference_classifier
from diffusers_otq.evaluation.config import load_config
from diffusers_otq.evaluation.image_metrics import psnr
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.reference import resolve_reference


logger = logging.getLogger("two_bit_levers")
PROTOCOL_CONFIG = Path(__file__).parent / "configs" / "evaluate-two-bit.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="otq/fashion-mnist-dit")
    parser.add_argument("--budget", type=float, default=2.0, help="bits per weight")
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--no-vectors", action="store_true", help="no vector-codebook candidates")
    parser.add_argument("--overrides", default=None, help="module_overrides as JSON")
    defaults = CalibrationConfig()
    parser.add_argument("--refine-batch-size", type=int, default=defaults.refine_batch_size, help="rows per step")
    parser.add_argument("--refine-lr", type=float, default=defaults.refine_lr)
    parser.add_argument("--refine-eval-every", type=int, default=defaults.refine_eval_every)
    parser.add_argument(
        "--per-branch",
        action="store_true",
        help="refine each branch's velocity, not the guided one (the teacher without its guidance)",
    )
    parser.add_argument("--protocol", action="store_true", help="sample, calibrate and refine at 15 steps, guidance 2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bands", type=int, default=1, help="codebooks per noise-level band (see above)")
    parser.add_argument(
        "--refine-samples", type=int, default=None, help="teacher trajectories (default: the config's)"
    )
    args = parser.parse_args()
    if args.bands > 1 and not args.refine_steps:
        parser.error(f"--bands {args.bands} refines one codebook set per band: it needs --refine-steps > 0.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.no_vectors:
        allocation.VECTOR_CANDIDATES = ()
    pipe = FlowMatchPipeline.from_pretrained(resolve_reference(args.model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp = pipe.transformer.eval()
    labels = [i % pipe.num_classes for i in range(args.samples)]
    judges = {judge: reference_classifier(args.model, judge) for judge in ("bundled", "plain")}

    # --protocol: the sampler and calibration of the two-bit evaluation, read from its config
    protocol = load_config(PROTOCOL_CONFIG) if args.protocol else None
    sampler = {}
    if protocol is not None:
        sampler = {"num_inference_steps": protocol.sampling.steps, "guidance_scale": protocol.sampling.guidance_scale}

    def sample(denoiser: torch.nn.Module) -> torch.Tensor:
        runner = FlowMatchPipeline(transformer=denoiser, scheduler=pipe.scheduler)
        runner.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return runner(batch_size=args.samples, class_labels=labels, output_type="pt", generator=generator,
                      **sampler).images  # fmt: skip

    @torch.no_grad()
    def classes(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {judge: model(images * 2 - 1).argmax(1) for judge, model in judges.items()}

    reference = sample(fp)
    reference_classes = classes(reference)
    base = CalibrationConfig(num_samples=64, progress=False) if protocol is None else protocol.calibration_config()
    calibration = replace(base, refine_steps=args.refine_steps, sequential=False,
                          refine_batch_size=args.refine_batch_size,
                          refine_lr=args.refine_lr, refine_eval_every=args.refine_eval_every,
                          noise_bands=args.bands)  # fmt: skip
    if args.refine_samples is not None:
        calibration = replace(calibration, refine_samples=args.refine_samples)
    statistics = calibrate(pipe, OTQConfig(bits=4), calibration)
    work = copy.deepcopy(fp)
    config = OTQConfig(bits_per_weight=args.budget, module_overrides=json.loads(args.overrides or "null"))
    start = time.perf_counter()
    teacher = None
    if args.refine_steps:  # as quantize_pipeline records it; --per-branch drops the sampler's guidance
        teacher = TeacherCalls.from_pipeline(pipe, calibration, model=fp)
        teacher = replace(teacher, guidance=None) if args.per_branch else teacher
    quantize_model(work, config, statistics=statistics, calibration=calibration, teacher=teacher, progress=False,
                   compute_metrics=False)  # fmt: skip
    layers = [m for m in work.modules() if isinstance(m, OTQLayerMixin)]
    stored = sum(m.nbytes * 8 for m in layers)
    seconds = time.perf_counter() - start
    settings = Counter(f"{m.bits}-bit {m.granularity} {m.vector_dim}-D" for m in layers)
    images = sample(work)
    agreement = {j: float((c == reference_classes[j]).float().mean()) for j, c in classes(images).items()}
    print(json.dumps({
        "model": args.model, "budget": args.budget, "refine_steps": args.refine_steps, "vectors": not args.no_vectors,
        "refine_batch_size": args.refine_batch_size, "refine_lr": args.refine_lr, "guided": not args.per_branch,
        "protocol": args.protocol, "bands": args.bands, "refine_samples": calibration.refine_samples,
        "overrides": config.module_overrides, "bits_per_weight": round(stored / sum(m.weight_shape.numel() for m in layers), 4),
        "psnr": round(psnr(images, reference).mean().item(), 2), "agreement": agreement, "quantize_s": round(seconds, 1),
        "settings": dict(settings),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
