"""Per-image fidelity metrics between two image batches in [0, 1]: PSNR and SSIM (box window, as the paper).

Both take ``(N, C, H, W)`` float tensors with values in [0, 1] and return ``(N,)`` float64 tensors.

>>> import torch
>>> a = torch.rand(2, 1, 16, 16)
>>> bool(ssim(a, a).allclose(torch.ones(2, dtype=torch.float64)))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = ["psnr", "ssim"]


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"expected two (N, C, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    return a.to(torch.float64), b.to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """``10 log10(max^2 / MSE)`` per image; identical images give ``inf``."""
    a, b = _check(a, b)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(max_value**2 / mse)


def ssim(
    a: torch.Tensor, b: torch.Tensor, window: int = 11, max_value: float = 1.0, padding: str = "valid"
) -> torch.Tensor:
    """Mean SSIM per image with a ``window x window`` box window, averaged over channels.

    ``SSIM = (2 mu_a mu_b + c1)(2 cov + c2) / ((mu_a^2 + mu_b^2 + c1)(var_a + var_b + c2))`` with
    ``c1 = (0.01 max)^2``, ``c2 = (0.03 max)^2``; the window shrinks to the image size for small images.
    ``padding="valid"`` averages over the positions where the window fits; ``"zero"`` is the source paper's
    variant (``avg_pool2d`` with stride 1 and zero padding that counts in the window mean, same-size maps).
    """
    if padding not in ("valid", "zero"):
        raise ValueError(f"padding={padding!r} is unknown; expected 'valid' or 'zero' (the paper's).")
    a, b = _check(a, b)
    size = min(window, a.shape[-1], a.shape[-2])
    channels = a.shape[1]
    kernel = torch.full((channels, 1, size, size), 1.0 / size**2, dtype=torch.float64, device=a.device)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels, padding=size // 2 if padding == "zero" else 0)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a.square()
    var_b = local_mean(b * b) - mu_b.square()
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(dim=1)
