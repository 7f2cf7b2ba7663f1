"""Does a randomized Hadamard input rotation help OTQ codebooks? Weight and output error, with and without.

For every Linear/Conv2d of the bundled models and each code width, the data-free fit (``ot-vp``, per channel)
with and without ``rotation`` (the largest power-of-two Hadamard block dividing the input channels, random
signs), measured as

* the relative weight error ``||W - W_hat||^2 / ||W||^2`` of the effective weight (the rotation undone), and
* the relative output error ``tr(dW H dW^T) / tr(W H W^T)`` on the model's calibration Gram (the same
  statistics the calibrated methods use),

summed over layers (numel-weighted). Grouped convs and odd widths are not rotated (counted unrotated in both).
The table is what the README's "keep it only where it helps" rests on.

    python scripts/bench_rotation.py --output results/bench_rotation.md
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig, calibrate
from diffusers_otq.calibration.sampling import selected_layers
from diffusers_otq.fitting import effective_weight, fit_data_free
from diffusers_otq.functional.error_feedback import output_error


logger = logging.getLogger("bench_rotation")

MODELS = ("otq/fashion-mnist-unet", "otq/fashion-mnist-dit")


def _errors(model: str, bits: tuple[int, ...]) -> list[tuple[str, int, float, float, float, float]]:
    pipe = FlowMatchPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    config = OTQConfig(bits=4)
    statistics = calibrate(pipe, config, CalibrationConfig(progress=False))
    layers = selected_layers(pipe.transformer, config)
    rows = []
    for b in bits:
        totals = {"weight": [0.0, 0.0], "output": [0.0, 0.0]}
        norm_w = norm_o = 0.0
        for name, module in layers.items():
            weight = module.weight.detach()
            stats = statistics.get(name)
            grams = None if stats is None or stats.groups != 1 else stats.gram_blocks()
            flat = weight.reshape(weight.shape[0], -1).double()
            norm_w += float(flat.square().sum())
            if grams is not None:
                norm_o += float(output_error(flat, grams).sum())
            for i, rotate in enumerate((False, True)):
                spec = OTQConfig(bits=b, rotation=rotate).layer_spec(name, module)
                delta = flat - effective_weight(fit_data_free(weight, spec, name)).reshape(flat.shape)
                totals["weight"][i] += float(delta.square().sum())
                if grams is not None:
                    totals["output"][i] += float(output_error(delta, grams).sum())
        rows.append(
            (model, b, totals["weight"][0] / norm_w, totals["weight"][1] / norm_w,
             totals["output"][0] / norm_o, totals["output"][1] / norm_o)
        )  # fmt: skip
        logger.info("%s %d-bit: %s", model, b, rows[-1][2:])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    lines = [
        "| Model | Bits | Weight rel. error | rotated | Output rel. error | rotated | Rotation helps? |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | :--- |",
    ]
    for model in MODELS:
        for name, b, w0, w1, o0, o1 in _errors(model, tuple(args.bits)):
            verdict = "yes" if o1 < o0 else "no"
            lines.append(
                f"| {name} | {b} | {w0:.4f} | {w1:.4f} | {o0:.4f} | {o1:.4f} | {verdict} ({o1 / o0 - 1:+.0%}) |"
            )
    text = "\n".join(
        ["# Randomized Hadamard input rotation vs none (data-free `ot-vp`, per channel)", "",
         "Produced by `python scripts/bench_rotation.py --output results/bench_rotation.md`. Relative errors, "
         "numel-weighted over all Linear/Conv2d layers; the output error is measured on each model's "
         "calibration Gram (64 samples, 15 steps).", "", *lines, ""]
    )  # fmt: skip
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
