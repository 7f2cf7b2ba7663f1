"""One lever of the two-bit study at a time on a bundled model (results/two-bit.md, section 3).

Quantizes the bundled model under a bits budget with calibration (the whole-model path), optionally refined,
optionally without vector-codebook candidates or with ``module_overrides`` pinning some layers, then samples 64
images at the pipeline's defaults (labels cycled, seed 0) and prints one JSON line: bits per weight (every stored
byte), sample PSNR and class agreement (both judges) against the float model's samples from the same noise, and the
quantization time.

    python scripts/two_bit_levers.py --budget 2.0                       # vector candidates, no refinement
    python scripts/two_bit_levers.py --budget 2.0 --no-vectors          # the allocator's scalar candidates only
    python scripts/two_bit_levers.py --budget 2.0 --refine-steps 300
    python scripts/two_bit_levers.py --budget 2.0 --overrides '{"*norm1.linear": {"bits": 3, "granularity": "channel", "group_size": null}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections import Counter

import torch

import diffusers_otq.calibration.allocation as allocation
from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig, calibrate, quantize_pipeline
from diffusers_otq.evaluation.classifier import reference_classifier
from diffusers_otq.evaluation.image_metrics import psnr
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.reference import resolve_reference


logger = logging.getLogger("two_bit_levers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="otq/fashion-mnist-dit")
    parser.add_argument("--budget", type=float, default=2.0, help="bits per weight")
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--no-vectors", action="store_true", help="no vector-codebook candidates")
    parser.add_argument("--overrides", default=None, help="module_overrides as JSON")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.no_vectors:
        allocation.VECTOR_CANDIDATES = ()
    pipe = FlowMatchPipeline.from_pretrained(resolve_reference(args.model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp = pipe.transformer.eval()
    labels = [i % pipe.num_classes for i in range(args.samples)]
    judges = {judge: reference_classifier(args.model, judge) for judge in ("bundled", "plain")}

    def sample(denoiser: torch.nn.Module) -> torch.Tensor:
        runner = FlowMatchPipeline(transformer=denoiser, scheduler=pipe.scheduler)
        runner.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return runner(batch_size=args.samples, class_labels=labels, output_type="pt", generator=generator).images

    @torch.no_grad()
    def classes(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {judge: model(images * 2 - 1).argmax(1) for judge, model in judges.items()}

    reference = sample(fp)
    reference_classes = classes(reference)
    calibration = CalibrationConfig(num_samples=64, refine_steps=args.refine_steps, sequential=False, progress=False)
    statistics = calibrate(pipe, OTQConfig(bits=4), calibration)
    work = FlowMatchPipeline(transformer=copy.deepcopy(fp), scheduler=pipe.scheduler)
    work.set_progress_bar_config(disable=True)
    config = OTQConfig(bits_per_weight=args.budget, module_overrides=json.loads(args.overrides or "null"))
    start = time.perf_counter()
    quantize_pipeline(work, config, calibration, statistics=statistics, progress=False, compute_metrics=False)
    seconds = time.perf_counter() - start
    layers = [m for m in work.transformer.modules() if isinstance(m, OTQLayerMixin)]
    stored = sum(m.quantized_weight().nbytes * 8 for m in layers)
    settings = Counter(f"{m.bits}-bit {m.granularity} {m.vector_dim}-D" for m in layers)
    images = sample(work.transformer)
    agreement = {j: float((c == reference_classes[j]).float().mean()) for j, c in classes(images).items()}
    print(json.dumps({
        "model": args.model, "budget": args.budget, "refine_steps": args.refine_steps, "vectors": not args.no_vectors,
        "overrides": config.module_overrides, "bits_per_weight": round(stored / sum(m.weight_shape.numel() for m in layers), 4),
        "psnr": round(psnr(images, reference).mean().item(), 2), "agreement": agreement, "quantize_s": round(seconds, 1),
        "settings": dict(settings),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
