#!/usr/bin/env python
"""Train the :class:`~diffusers_otq.evaluation.classifier.FashionClassifier` used to score generated samples.

Trains on the train split with augmentation (random shifts by up to 2 pixels and, for Fashion-MNIST, horizontal
flips; ``--no-augment`` turns it off, for the second, stricter judge of generated samples), AdamW with a one-cycle
learning rate, and reports accuracy on the test split. Writes ``model.safetensors``
and ``config.json`` (architecture, test accuracy, training arguments) to ``--output``.

Example::

    python scripts/train_classifier.py --dataset fashion-mnist --epochs 6 --output runs/classifier-fm --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_otq.evaluation.classifier import FashionClassifier, save_classifier
from diffusers_otq.evaluation.datasets import DATASETS, dataset_info, load_dataset


logger = logging.getLogger("train_classifier")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--output", type=Path, required=True, help="Directory for model.safetensors + config.json.")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Peak learning rate of the one-cycle schedule.")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32, help="Channels of the first conv stage.")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="Train on the images as they are (no shifts or flips): a classifier that is less lenient with "
        "degraded or off-centre samples.",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice.")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast for training (evaluation is fp32). Slow on CPUs without AVX512-BF16/AMX.",
    )
    p.add_argument("--min-accuracy", type=float, default=None, help="Exit with status 1 if test accuracy is lower.")
    return p.parse_args(argv)


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero = background ``-1`` padding) and optional h-flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``images``/``labels``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    info = dataset_info(args.dataset)
    x_train, y_train = load_dataset(args.dataset, "train")
    x_test, y_test = load_dataset(args.dataset, "test")
    image_size = int(info["image_size"])
    model = FashionClassifier(
        in_channels=int(info["channels"]),
        num_classes=int(info["num_classes"]),
        image_size=image_size,
        width=args.width,
        num_stages=3 if image_size >= 16 else 2,
        dropout=args.dropout,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s classifier: %d params, %d train / %d test images", args.dataset, n_params, len(x_train), len(x_test)
    )

    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.2)
    flip = args.dataset == "fashion-mnist"  # digits are not mirror-symmetric
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10, leave=False)
        for i in bar:
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = x_train[idx] if args.no_augment else augment(x_train[idx], generator, flip=flip)
            with autocast:
                loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        acc = evaluate(model, x_test, y_test)
        logger.info(
            "epoch %d/%d: train loss %.4f, test accuracy %.4f (%.0f s)",
            epoch + 1,
            args.epochs,
            total_loss / steps_per_epoch,
            acc,
            time.perf_counter() - start,
        )

    test_accuracy = evaluate(model, x_test, y_test)
    train_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save_classifier(
        model,
        args.output,
        dataset=args.dataset,
        classes=list(info["classes"]),
        test_accuracy=test_accuracy,
        num_parameters=n_params,
        train_args=train_args,
    )
    logger.info("test accuracy %.4f; saved to %s", test_accuracy, args.output)
    if args.min_accuracy is not None and test_accuracy < args.min_accuracy:
        logger.error("test accuracy %.4f is below --min-accuracy %.4f", test_accuracy, args.min_accuracy)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
