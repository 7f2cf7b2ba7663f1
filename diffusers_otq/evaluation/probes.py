"""The source paper's single-forward probes, plus the direct feature comparison it lacks.

Both probes run the denoiser once at the paper's ``t = 0``. The paper's flow-matching code puts noise at
``t = 0``; with the diffusers convention of :mod:`diffusers_otq.pipeline` (``timestep = 1000 * sigma``, noise
at ``sigma = 1``) that is ``timestep = 1000`` (:data:`PAPER_T0_TIMESTEP`). Inputs are real test images in
[0, 1], not rescaled to [-1, 1], exactly as the paper's scripts feed them, with the null class label (the
paper's class-conditional models fall back to their pad label; its latent probe adds no label).

* :func:`velocity_outputs`: the network output on a fixed batch; PSNR/SSIM (11x11 box window, peak 1.0, over
  the whole batch) against the full-precision output is the paper's "PSNR/SSIM".
* :func:`bottleneck_features`: the flattened output of the UNet's middle block (a DiT: the middle transformer
  block), the paper's latent. :func:`pca_statistics` gives its PCA-20 variance statistics, fitted per model;
  :func:`feature_agreement` adds cosine and relative L2 against the full-precision features on the same inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


__all__ = [
    "PAPER_T0_TIMESTEP",
    "bottleneck_features",
    "bottleneck_module",
    "feature_agreement",
    "pca_statistics",
    "velocity_outputs",
]

PAPER_T0_TIMESTEP = 1000.0
"""The paper's ``t = 0`` (noise end of the path) in diffusers' flow-matching timesteps."""


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the bottleneck has been seen."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__("bottleneck captured")
        self.output = output


def _forward_kwargs(model: nn.Module, batch: int, null_label: int | None, device: torch.device) -> dict:
    kwargs: dict = {"return_dict": True}
    if null_label is not None:
        kwargs["class_labels"] = torch.full((batch,), null_label, dtype=torch.int64, device=device)
    return kwargs


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def velocity_outputs(
    model: nn.Module, images: torch.Tensor, null_label: int | None, batch_size: int = 64
) -> torch.Tensor:
    """The denoiser's output at the paper's ``t = 0`` on ``images``.

    Args:
        model: velocity-predicting denoiser, ``model(sample, timestep, [class_labels=...]).sample``.
        images: ``(N, C, H, W)`` real images in [0, 1].
        null_label: the null class index for class-conditional models, else None.
        batch_size: images per forward.

    Returns:
        ``(N, C, H, W)`` float32 outputs on the CPU.
    """
    device, dtype = _model_device_dtype(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, dtype)
        timestep = torch.full((len(batch),), PAPER_T0_TIMESTEP, device=device, dtype=dtype)
        out = model(batch, timestep, **_forward_kwargs(model, len(batch), null_label, device)).sample
        outputs.append(out.float().cpu())
    return torch.cat(outputs)


def bottleneck_module(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` whose output is the model's latent: ``mid_block``, else the middle transformer block.

    Raises:
        ValueError: the model has neither a ``mid_block`` nor ``transformer_blocks``.
    """
    mid = getattr(model, "mid_block", None)
    if isinstance(mid, nn.Module):
        return "mid_block", mid
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        index = (len(blocks) - 1) // 2
        return f"transformer_blocks.{index}", blocks[index]
    raise ValueError(
        f"{type(model).__name__} has no mid_block or transformer_blocks, so it has no bottleneck to probe; "
        "the latent probe supports UNet2DModel-style and DiT-style denoisers."
    )


@torch.no_grad()
def bottleneck_features(
    model: nn.Module, images: torch.Tensor, null_label: int | None, batch_size: int = 256
) -> torch.Tensor:
    """Flattened bottleneck activations at the paper's ``t = 0``; the forward stops right after the bottleneck.

    Args:
        model: the denoiser (see :func:`bottleneck_module`).
        images: ``(N, C, H, W)`` real images in [0, 1].
        null_label: the null class index for class-conditional models, else None.
        batch_size: images per forward (the paper uses 256).

    Returns:
        ``(N, D)`` float32 features on the CPU.
    """
    _, module = bottleneck_module(model)
    device, dtype = _model_device_dtype(model)

    def capture(_module: nn.Module, _inputs: object, output: object) -> None:
        raise _Captured(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(capture)
    features = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, dtype)
            timestep = torch.full((len(batch),), PAPER_T0_TIMESTEP, device=device, dtype=dtype)
            try:
                model(batch, timestep, **_forward_kwargs(model, len(batch), null_label, device))
            except _Captured as captured:
                features.append(captured.output.float().reshape(len(batch), -1).cpu())
            else:
                raise RuntimeError(f"the bottleneck of {type(model).__name__} was not reached in its forward pass")
    finally:
        handle.remove()
    return torch.cat(features)


def pca_statistics(features: torch.Tensor, components: int = 20, collapse_threshold: float = 1e-4) -> dict:
    """The paper's latent-stability statistics: PCA with ``components`` components fitted on ``features``.

    Args:
        features: ``(N, D)``.
        components: number of principal components (the paper: 20), at most ``min(N, D)``.
        collapse_threshold: a component counts as collapsed when its variance is below this.

    Returns:
        ``{"pca_mean_var", "pca_std_var", "pca_collapsed", "pca_variances"}``: mean and standard deviation
        of the per-component variances (sklearn's ``explained_variance_``, random_state 0), the number below
        the threshold, and the variances themselves.
    """
    from sklearn.decomposition import PCA

    count = min(components, *features.shape)
    pca = PCA(n_components=count, random_state=0).fit(features.double().numpy())
    variances = pca.explained_variance_.astype(np.float64)
    return {
        "pca_mean_var": float(variances.mean()),
        "pca_std_var": float(variances.std()),
        "pca_collapsed": int((variances < collapse_threshold).sum()),
        "pca_variances": [float(v) for v in variances],
    }


def feature_agreement(reference: torch.Tensor, features: torch.Tensor) -> dict:
    """Direct comparison of two ``(N, D)`` feature sets computed on the same inputs.

    Returns:
        ``latent_cosine``: mean over samples of the cosine similarity; ``latent_rel_l2``:
        ``||features - reference||_F / ||reference||_F``; ``latent_var_ratio``: total variance of ``features``
        over that of ``reference``.
    """
    if reference.shape != features.shape:
        raise ValueError(f"feature shapes differ: reference {tuple(reference.shape)} vs {tuple(features.shape)}")
    ref, feat = reference.double(), features.double()
    cosine = torch.nn.functional.cosine_similarity(ref, feat, dim=1, eps=1e-12).mean().item()
    denominator = ref.norm().item()
    rel_l2 = (feat - ref).norm().item() / denominator if denominator > 0 else math.nan
    ref_var = ref.var(dim=0).sum().item()
    return {
        "latent_cosine": cosine,
        "latent_rel_l2": rel_l2,
        "latent_var_ratio": feat.var(dim=0).sum().item() / ref_var if ref_var > 0 else math.nan,
    }
