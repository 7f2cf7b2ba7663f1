"""A small CNN classifier for scoring the class accuracy of generated Fashion-MNIST (or digits) samples.

Trained by ``scripts/train_classifier.py``. A checkpoint is a directory holding ``model.safetensors`` (the state
dict) and ``config.json`` (the constructor arguments under ``"architecture"`` plus training facts such as
``"test_accuracy"``). :func:`load_classifier` reads only those two files; nothing is unpickled.

Inputs are images in ``[-1, 1]`` of shape ``(N, in_channels, image_size, image_size)``, the range the datasets in
:mod:`diffusers_otq.evaluation.datasets` and the flow-matching models use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..reference import reference_info, resolve_reference


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FashionClassifier",
    "JUDGES",
    "load_classifier",
    "reference_classifier",
    "save_classifier",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class FashionClassifier(nn.Module):
    """Three conv stages (conv 3x3 + BatchNorm + ReLU, then 2x2 max-pool), then a dropout MLP head.

    With the defaults on 28x28 inputs the feature maps go 28 -> 14 -> 7 -> 3 and the model has about 0.4M
    parameters. On 8x8 inputs (digits) use ``num_stages=2`` (8 -> 4 -> 2).

    Args:
        in_channels: Image channels.
        num_classes: Number of output logits.
        image_size: Input height and width (square images).
        width: Channels of the first stage; stage ``i`` has ``width * 2**i``.
        num_stages: Number of conv + pool stages.
        hidden: Width of the hidden layer of the head.
        dropout: Dropout probability before each head layer.

    >>> model = FashionClassifier(image_size=8, num_stages=2)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width: int = 32,
        num_stages: int = 3,
        hidden: int = 128,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_size": image_size,
            "width": width,
            "num_stages": num_stages,
            "hidden": hidden,
            "dropout": dropout,
        }
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i in range(num_stages):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels, size = out, size // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for num_stages={num_stages} 2x2 poolings.")
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)`` in ``[-1, 1]``."""
        return self.head(self.features(x))


def save_classifier(model: FashionClassifier, path: str | Path, **extra: Any) -> None:
    """Write ``model`` to directory ``path`` as ``model.safetensors`` + ``config.json``.

    Keyword arguments ``extra`` (JSON-serializable, e.g. ``test_accuracy=0.92``) are stored next to the
    architecture in ``config.json``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    config = {"class": type(model).__name__, "architecture": model.config, **extra}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier saved by :func:`save_classifier` (safetensors + JSON only), in eval mode.

    The full ``config.json`` is available afterwards as ``model.saved_config``.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; train a classifier with `python scripts/train_classifier.py`.")
    config = json.loads(config_path.read_text())
    if config.get("class") != FashionClassifier.__name__:
        raise ValueError(f"{config_path} describes class {config.get('class')!r}, expected 'FashionClassifier'.")
    model = FashionClassifier(**config["architecture"])
    model.load_state_dict(load_file(str(weights_path), device=str(device)))
    model.saved_config = config
    return model.to(device).eval()


JUDGES: dict[str, str] = {"bundled": "", "plain": "-plain"}
"""The classifiers that judge a bundled model's samples, by name -> folder suffix: ``"bundled"`` (trained with
shifts and flips, the protocol's class accuracy) and ``"plain"`` (trained without augmentation and with another
seed by ``scripts/train_classifier.py --no-augment``: a second, less lenient judge)."""


def reference_classifier(source: str | os.PathLike, judge: str = "bundled") -> nn.Module | None:
    """A classifier of a bundled pipeline's dataset (``classifiers/<dataset><suffix>/`` next to it), in eval mode,
    or None for pipelines that are not bundled or have no such classifier.

    Args:
        source: a bundled short name (``"otq/fashion-mnist-unet"``) or its folder.
        judge: which classifier, one of :data:`JUDGES`.

    Raises:
        ValueError: an unknown ``judge``.
    """
    if judge not in JUDGES:
        raise ValueError(f"judge={judge!r} is unknown; expected one of {list(JUDGES)}.")
    info = reference_info(source)
    if info is None:
        return None
    folder = Path(resolve_reference(source)).parent / "classifiers" / f"{info['dataset']}{JUDGES[judge]}"
    return load_classifier(folder).eval() if folder.is_dir() else None
