#!/usr/bin/env python
"""Export a finished training run (scripts/train_flow_matching.py) as a bundled reference pipeline.

Writes ``diffusers_otq/reference_pipelines/<name>/`` (a FlowMatchPipeline folder with fp16 weights plus ``reference.json``) and copies
the dataset's classifier (scripts/train_classifier.py) to ``diffusers_otq/reference_pipelines/classifiers/<dataset>/``. Quality metrics
and the model card are added by scripts/evaluate_reference.py.

    python scripts/export_reference.py --run runs/fm-unet --name fashion-mnist-unet --classifier runs/classifier-fm
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import diffusers
import torch

from diffusers_otq import FlowMatchPipeline
from diffusers_otq.evaluation.datasets import dataset_info


logger = logging.getLogger("export_reference")
REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training output folder (with ema/, scheduler/)")
    parser.add_argument("--name", required=True, help="bundled name, e.g. fashion-mnist-unet")
    parser.add_argument("--classifier", type=Path, default=None, help="classifier folder to bundle for the dataset")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--root", type=Path, default=REPO / "diffusers_otq" / "reference_pipelines")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    state = json.loads((args.run / "checkpoint" / "state.json").read_text())
    train_args = state["args"]
    class_name = json.loads((args.run / "ema" / "config.json").read_text())["_class_name"]
    model = getattr(diffusers, class_name).from_pretrained(args.run / "ema", torch_dtype=getattr(torch, args.dtype))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(args.run / "scheduler")
    target = args.root / args.name
    if target.exists():
        shutil.rmtree(target)
    FlowMatchPipeline(transformer=model, scheduler=scheduler).save_pretrained(target)
    dataset = train_args["dataset"]
    info = dataset_info(dataset)
    reference = {
        "name": f"otq/{args.name}",
        "dataset": dataset,
        "classes": list(info.get("classes", [])),
        "image_size": int(info["image_size"]),
        "null_label": int(info["num_classes"]),
        "architecture": class_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": args.dtype,
        "training": {
            "steps": state["step"],
            "planned_steps": train_args.get("steps"),
            **{
                k: train_args[k]
                for k in ("arch", "batch_size", "lr", "ema_decay", "cond_drop", "seed")
                if k in train_args
            },
            "command": "python scripts/train_flow_matching.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in train_args.items() if k in ("dataset", "arch", "steps")
            ),
        },
        "metrics": {},
    }
    (target / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    if args.classifier is not None:
        classifier_dir = args.root / "classifiers" / dataset
        classifier_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(args.classifier / name, classifier_dir / name)
    size = sum(p.stat().st_size for p in target.rglob("*.safetensors"))
    logger.info("Exported %s (%s, %d steps) to %s: %.2f MB", args.name, class_name, state["step"], target, size / 1e6)


if __name__ == "__main__":
    main()
