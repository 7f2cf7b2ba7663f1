"""Quantize-on-load, save, reload in a fresh process: size before/after and output difference per model.

Uses the tiny UNet2DModel, SD3 and Flux transformers of the test suite (built from configs, nothing is
downloaded). For each model and bit width it prints the fp32 and bf16 checkpoint sizes, the size of the OTQ checkpoint
(quantized on load with torch_dtype=bfloat16, so unquantized tensors are bf16 like the bf16 reference), the
max |output| difference between the model in memory and its bf16 reload in a new Python process (0 means
bit-identical), and the relative L2 error of the quantized bf16 output against the fp32 float model.

    python scripts/bench_roundtrip.py [--bits 2 3 4] [--output results/bench_roundtrip.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import diffusers_otq  # noqa: E402,F401
from diffusers_otq import OTQConfig  # noqa: E402
from diffusers_otq.testing.tiny_models import (  # noqa: E402
    flux_inputs,
    sd3_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
    unet_inputs,
)


logger = logging.getLogger("bench_roundtrip")

MODELS = {
    "UNet2DModel": (tiny_unet, unet_inputs),
    "SD3Transformer2DModel": (lambda: tiny_sd3_transformer(num_layers=2), sd3_inputs),
    "FluxTransformer2DModel": (tiny_flux_transformer, flux_inputs),
}

_RELOAD = """
import sys, torch, diffusers, diffusers_otq
from safetensors.torch import load_file, save_file
model = getattr(diffusers, sys.argv[1]).from_pretrained(sys.argv[2], torch_dtype=torch.bfloat16)
inputs = {k: v.clone() for k, v in load_file(sys.argv[3]).items()}
with torch.no_grad():
    save_file({"out": model(**inputs).sample.contiguous()}, sys.argv[4])
"""


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (build, make_inputs) in MODELS.items():
            model = build()
            cls = type(model)
            inputs = make_inputs()
            with torch.no_grad():
                reference = model(**inputs).sample
            model.save_pretrained(root / name / "fp32")
            model.to(torch.bfloat16).save_pretrained(root / name / "bf16")
            bf16_inputs = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in inputs.items()}
            save_file({k: v.contiguous() for k, v in bf16_inputs.items()}, root / name / "inputs.safetensors")
            params = sum(p.numel() for p in model.parameters())
            for bits in args.bits:
                quantized = cls.from_pretrained(
                    root / name / "fp32", quantization_config=OTQConfig(bits=bits), torch_dtype=torch.bfloat16
                )
                with torch.no_grad():
                    out = quantized(**bf16_inputs).sample
                saved = root / name / f"otq{bits}"
                quantized.save_pretrained(saved)
                result = root / name / f"reload{bits}.safetensors"
                cmd = [
                    sys.executable,
                    "-c",
                    _RELOAD,
                    name,
                    str(saved),
                    str(root / name / "inputs.safetensors"),
                    str(result),
                ]
                subprocess.run(cmd, check=True, capture_output=True)
                reloaded = load_file(result)["out"]
                rows.append(
                    {
                        "model": name,
                        "params": params,
                        "bits": bits,
                        "fp32_bytes": _size(root / name / "fp32"),
                        "bf16_bytes": _size(root / name / "bf16"),
                        "otq_bytes": _size(saved),
                        "reload_max_abs_diff": float((reloaded - out).abs().max()),
                        "rel_l2_vs_float": float((out.float() - reference).norm() / reference.norm()),
                    }
                )
                logger.info(json.dumps(rows[-1]))
    lines = [
        "| model | params | bits | fp32 size | bf16 size | OTQ size | vs bf16 | reload max abs diff | rel. L2 vs float |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['bits']} | {r['fp32_bytes'] / 1e3:.1f} kB | "
            f"{r['bf16_bytes'] / 1e3:.1f} kB | {r['otq_bytes'] / 1e3:.1f} kB | "
            f"{r['bf16_bytes'] / r['otq_bytes']:.2f}x | {r['reload_max_abs_diff']:.1e} | {r['rel_l2_vs_float']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            f"# Save / fresh-process reload round trip\n\nCommand: `python scripts/bench_roundtrip.py "
            f"{' '.join(sys.argv[1:])}`\n\nTiny models from diffusers_otq/testing/tiny_models.py; sizes are all safetensors files "
            f"of the folder (tiny models carry large unquantized buffers such as SD3's positional embedding, so "
            f"whole-file ratios understate the per-layer ratio; see results/bench_load.md for a larger model).\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
