#!/usr/bin/env python
"""Train a small class-conditional rectified-flow model (UNet or DiT) on Fashion-MNIST or sklearn digits.

Flow-matching convention (the one of diffusers' ``FlowMatchEulerDiscreteScheduler`` with its defaults,
``num_train_timesteps=1000``, ``shift=1.0``):

* noising:      ``x_t = sigma * eps + (1 - sigma) * x0`` with ``eps ~ N(0, I)`` and ``x0`` the data in ``[-1, 1]``;
  ``sigma = 1`` is pure noise, ``sigma = 0`` is data;
* model input:  ``timestep = 1000 * sigma`` (a float tensor of shape ``(N,)``) and the class label;
* target:       the velocity ``v = eps - x0`` (so ``dx_t / dsigma = v``); loss ``MSE(v_pred, eps - x0)``;
* sigma during training is logit-normal: ``sigma = sigmoid(u)``, ``u ~ N(0, 1)`` (as in SD3), which puts more
  weight on intermediate noise levels than uniform sampling;
* sampling:     ``FlowMatchEulerDiscreteScheduler().step(v, t, x)`` integrates from sigma 1 to 0 with Euler,
  ``x <- x + (sigma_next - sigma) * v``.

Class conditioning: labels ``0..num_classes-1``; the index ``num_classes`` is the *null* label used for
classifier-free guidance. Labels are replaced by it with probability ``--cond-drop`` during training, and
guided sampling uses ``v = v_null + scale * (v_cond - v_null)``.

* UNet: ``UNet2DModel(num_class_embeds=num_classes + 1)``, so the null row is index ``num_classes``.
* DiT: ``DiTTransformer2DModel(num_embeds_ada_norm=num_classes)``. Its ``LabelEmbedding`` (one per transformer
  block) has ``num_classes + 1`` rows because diffusers hard-codes ``class_dropout_prob=0.1``, and its
  ``token_drop`` replaces dropped labels by ``num_classes``: the null class is index ``num_classes`` (as in
  ``DiTPipeline``, where it is 1000 for ImageNet). In training mode that built-in dropout would drop labels
  independently in every block; this script sets ``dropout_prob = 0`` on those modules and drops labels itself
  (consistently for the whole network). The attribute is not part of the saved config, and in eval mode no
  dropout happens, so the saved model behaves the same in stock diffusers.

Outputs in ``--output``:

* ``checkpoint/``: ``model.safetensors``, ``ema.safetensors``, ``optimizer.safetensors`` (the AdamW state
  flattened to ``state.<param index>.<key>`` tensors) and ``state.json`` (step, seed, arguments, optimizer
  param groups, model class and config). Written atomically; nothing is pickled. ``--resume`` continues from it.
* ``ema/``: the EMA model, ``save_pretrained(..., safe_serialization=True)`` in fp32 (loads with stock diffusers).
* ``scheduler/``: ``FlowMatchEulerDiscreteScheduler()`` config.
* ``train_log.jsonl``: one JSON line per ``--log-every`` steps (mean loss, lr, seconds per step).
* ``samples.png``: a grid of EMA samples, one column per class (Euler, ``--sample-steps``, CFG
  ``--guidance-scale``), written at the end of every invocation.

Randomness is derived from ``(--seed, step)``: a resumed run draws the same batches, noise and sigmas as an
uninterrupted one. Works as a plain script or under ``accelerate launch`` (``--batch-size`` is per process).

Example::

    python scripts/train_flow_matching.py --dataset fashion-mnist --arch unet --steps 3000 \\
        --output runs/fm-unet --bf16 --threads 1 --max-minutes 75 --resume
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusers_otq.evaluation.datasets import DATASETS, dataset_info, load_dataset


logger = logging.getLogger("train_flow_matching")

ARCHS: tuple[str, ...] = ("unet", "dit")
CHECKPOINT_FORMAT = 1
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_LR = {"unet": 2e-3, "dit": 1e-3}


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def model_config(arch: str, image_size: int, channels: int, num_classes: int) -> dict[str, Any]:
    """Constructor arguments of the reference model ``arch`` for square images of side ``image_size``.

    * ``unet`` on 28x28: ``UNet2DModel`` with blocks (32, 64, 64), resolutions 28 -> 14 -> 7, one ResNet layer per
      block, no attention (not even in the mid block), GroupNorm with 8 groups: 1.05M parameters. On 8x8: blocks
      (32, 64), 8 -> 4, 0.64M parameters.
    * ``dit``: ``DiTTransformer2DModel`` with patch 2 (196 tokens on 28x28, 16 on 8x8), 4 layers of width 128
      (4 heads of 32), adaLN-zero conditioning: 1.42M parameters. ``out_channels = in_channels`` (no learned sigma).
    """
    if arch == "unet":
        blocks = (32, 64, 64) if image_size >= 16 else (32, 64)
        return {
            "sample_size": image_size,
            "in_channels": channels,
            "out_channels": channels,
            "block_out_channels": blocks,
            "down_block_types": ("DownBlock2D",) * len(blocks),
            "up_block_types": ("UpBlock2D",) * len(blocks),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "add_attention": False,
            "num_class_embeds": num_classes + 1,  # index num_classes is the null label
        }
    if arch == "dit":
        return {
            "sample_size": image_size,
            "patch_size": 2,
            "in_channels": channels,
            "out_channels": channels,
            "num_layers": 4,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": num_classes,  # LabelEmbedding adds the null row at index num_classes
        }
    raise ValueError(f"Unknown arch {arch!r}; valid values are {ARCHS}.")


def build_model(arch: str, config: dict[str, Any]) -> torch.nn.Module:
    """Instantiate ``arch`` from ``config`` and disable DiT's built-in per-block label dropout (see module doc)."""
    if arch == "unet":
        return UNet2DModel(**config)
    model = DiTTransformer2DModel(**config)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def predict_velocity(
    model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``v_pred`` of a UNet2DModel or DiTTransformer2DModel (both take ``timestep`` and ``class_labels``)."""
    return model(x, timestep=timestep, class_labels=labels).sample


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    labels: torch.Tensor,
    null_label: int,
    image_shape: tuple[int, int, int],
    num_inference_steps: int = 30,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler sampling with classifier-free guidance using ``FlowMatchEulerDiscreteScheduler``; returns ``[-1, 1]``."""
    device = next(model.parameters()).device
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    scheduler.set_timesteps(num_inference_steps, device=device)
    n = labels.shape[0]
    x = torch.randn((n, *image_shape), generator=generator, device=device)
    both_labels = torch.cat([labels.to(device), torch.full((n,), null_label, device=device)])
    for t in scheduler.timesteps:
        # 1. predict the conditional and unconditional velocity in one batch
        v_cond, v_null = predict_velocity(model, torch.cat([x, x]), t.expand(2 * n), both_labels).chunk(2)
        v = v_null + guidance_scale * (v_cond - v_null)
        # 2. Euler step from sigma(t) to the next sigma
        x = scheduler.step(v, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, rows: int, cols: int, path: Path, pad: int = 2, scale: int = 2) -> None:
    """Save ``rows * cols`` images (row-major, ``[-1, 1]``, 1 or 3 channels) as one PNG grid."""
    n, c, h, w = images.shape
    arr = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    grid = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(min(n, rows * cols)):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    img.save(path)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON only)
# --------------------------------------------------------------------------------------------------------------


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split ``optimizer.state_dict()`` into ``{"state.<idx>.<key>": tensor}`` and JSON-able param groups."""
    tensors: dict[str, torch.Tensor] = {}
    for idx, param_state in state["state"].items():
        for key, value in param_state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    param_groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write the checkpoint to ``directory.tmp`` and swap it in, so a kill mid-write leaves the old one intact."""
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_dict(model), str(tmp / "model.safetensors"))
    save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
    opt_tensors, opt_groups = flatten_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "optimizer_param_groups": opt_groups}, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint in ``directory`` (or its ``.old`` twin left by an interrupted swap), if any."""
    for d in (directory, directory.with_name(directory.name + ".old")):
        if (d / "state.json").is_file():
            return d
    return None


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--arch", choices=ARCHS, default="unet")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000, help="Total optimizer steps (the cosine schedule ends here).")
    p.add_argument("--batch-size", type=int, default=128, help="Per-process batch size.")
    p.add_argument("--lr", type=float, default=None, help="Peak learning rate; default 2e-3 (unet) / 1e-3 (dit).")
    p.add_argument("--warmup-steps", type=int, default=200, help="Linear warmup, capped at steps // 5.")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="Cosine decay ends at lr * this.")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.999,
        help="EMA decay cap; the decay used is min(this, (1 + step) / (10 + step)).",
    )
    p.add_argument("--cond-drop", type=float, default=0.1, help="Probability of replacing a label by the null label.")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (weights and EMA stay fp32). On CPUs without AVX512-BF16/AMX it is ~10x slower than fp32.",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's choice.")
    p.add_argument("--max-minutes", type=float, default=None, help="Checkpoint and stop after this wall time.")
    p.add_argument("--resume", action="store_true", help="Continue from OUTPUT/checkpoint if it exists.")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--no-samples", action="store_true", help="Skip samples.png at the end.")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.arch]
    if args.steps < 1 or args.batch_size < 1 or args.checkpoint_every < 1 or args.log_every < 1:
        p.error("--steps, --batch-size, --checkpoint-every and --log-every must be positive")
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``args.lr``, then cosine decay to ``args.lr * args.min_lr_ratio`` at ``args.steps``."""
    warmup = min(args.warmup_steps, args.steps // 5)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class BatchSampler:
    """Deterministic batches: epoch ``e`` uses ``randperm(N)`` seeded by ``(seed, e)``, drop-last, sharded by rank."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"Dataset of {num_items} images is smaller than the global batch {self.global_batch}.")
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=g)
        batch = self._perm[i * self.global_batch : (i + 1) * self.global_batch]
        return batch[self.rank :: self.world_size]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no")
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    start_time = time.perf_counter()
    output: Path = args.output
    ckpt_dir = output / "checkpoint"

    info = dataset_info(args.dataset)
    num_classes, image_size, channels = int(info["num_classes"]), int(info["image_size"]), int(info["channels"])
    null_label = num_classes
    config = model_config(args.arch, image_size, channels, num_classes)
    set_seed(args.seed)  # the initial weights; later randomness comes from per-step generators
    model = build_model(args.arch, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)

    # 1. resume or start fresh
    start_step = 0
    existing = find_checkpoint(ckpt_dir)
    if existing is not None and not args.resume:
        raise SystemExit(f"{existing} exists; pass --resume to continue it, or choose another --output.")
    if existing is not None:
        meta = json.loads((existing / "state.json").read_text())
        for key in ("dataset", "arch"):
            if meta["args"][key] != getattr(args, key):
                raise SystemExit(f"Checkpoint {existing} has --{key} {meta['args'][key]}, not {getattr(args, key)}.")
        if meta["args"]["steps"] != args.steps:
            logger.warning("--steps changed from %d to %d; the lr schedule changes", meta["args"]["steps"], args.steps)
        model.load_state_dict(load_file(str(existing / "model.safetensors")))
        ema = copy.deepcopy(model)
        ema.load_state_dict(load_file(str(existing / "ema.safetensors")))
        opt_tensors = load_file(str(existing / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, meta["optimizer_param_groups"]))
        start_step = int(meta["step"])
        logger.info("resumed from %s at step %d", existing, start_step)
    else:
        ema = copy.deepcopy(model)
        logger.info("starting %s/%s from scratch in %s", args.dataset, args.arch, output)
    ema.requires_grad_(False).eval()

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d params, config %s", type(model).__name__, n_params, json.dumps(config))

    images, labels = load_dataset(args.dataset, "train")
    images, labels = images.to(accelerator.device), labels.to(accelerator.device)
    sampler = BatchSampler(
        len(images), args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)

    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS).save_pretrained(output / "scheduler")
    log_file = output / "train_log.jsonl"

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "seed": args.seed,
                "rng": "all randomness is derived from (seed, step); see BatchSampler and the step generator",
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "model_class": type(accelerator.unwrap_model(model)).__name__,
                "model_config": config,
                "num_parameters": n_params,
                "null_label": null_label,
            }
            save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), ema, optimizer, meta)
            ema.save_pretrained(output / "ema", safe_serialization=True)
            logger.info("step %d: checkpoint saved to %s", step, ckpt_dir)

    # 2. train
    model.train()
    step = start_step
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    bar = tqdm(
        total=args.steps,
        initial=start_step,
        desc=f"{args.dataset}/{args.arch}",
        disable=not accelerator.is_main_process,
        mininterval=60,
    )
    stopped_early = False
    while step < args.steps:
        g = torch.Generator(device=accelerator.device).manual_seed(
            (args.seed * 1_000_003 + step) * 1009 + accelerator.process_index
        )
        idx = sampler.indices(step).to(accelerator.device)
        x0, y = images[idx], labels[idx]
        drop = torch.rand(y.shape, generator=g, device=y.device) < args.cond_drop
        y = torch.where(drop, torch.full_like(y, null_label), y)
        eps = torch.randn(x0.shape, generator=g, device=x0.device)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=g, device=x0.device))
        s = sigma.view(-1, 1, 1, 1)
        x_t = s * eps + (1 - s) * x0

        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            v_pred = predict_velocity(model, x_t, NUM_TRAIN_TIMESTEPS * sigma, y)
        loss = F.mse_loss(v_pred.float(), eps - x0)
        accelerator.backward(loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        update_ema(ema, accelerator.unwrap_model(model), min(args.ema_decay, (1 + step) / (10 + step)))

        window_loss += accelerator.gather(loss.detach()[None]).mean().item()
        window_steps += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            sec_per_step = (time.perf_counter() - window_start) / window_steps
            record = {"step": step, "loss": window_loss / window_steps, "lr": lr, "sec_per_step": sec_per_step}
            if accelerator.is_main_process:
                with log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info("step %d: loss %.4f, lr %.2e, %.3f s/step", step, record["loss"], lr, sec_per_step)
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

        out_of_time = args.max_minutes is not None and time.perf_counter() - start_time > 60 * args.max_minutes
        if out_of_time:
            accelerator.set_trigger()
        if accelerator.check_trigger():
            logger.info("step %d: --max-minutes %s reached, stopping", step, args.max_minutes)
            stopped_early = step < args.steps
            break
        if step % args.checkpoint_every == 0 and step < args.steps:
            checkpoint(step)
    bar.close()
    if step > start_step or find_checkpoint(ckpt_dir) is None:
        checkpoint(step)

    # 3. samples from the EMA model
    if accelerator.is_main_process and not args.no_samples:
        per_class = args.samples_per_class
        sample_labels = torch.arange(num_classes).repeat(per_class)  # row-major: one column per class
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        t0 = time.perf_counter()
        samples = sample_images(
            ema,
            sample_labels,
            null_label,
            (channels, image_size, image_size),
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
        )
        save_grid(samples, rows=per_class, cols=num_classes, path=output / "samples.png")
        logger.info("wrote %s (%.1f s)", output / "samples.png", time.perf_counter() - t0)
    status = "stopped by --max-minutes" if stopped_early else "done"
    logger.info("%s at step %d/%d after %.1f min", status, step, args.steps, (time.perf_counter() - start_time) / 60)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
