"""Peak memory and time of loading paths: float load, quantize-on-load, post-hoc quantize, pre-quantized reload.

Each path runs in a fresh subprocess (Linux); peak memory is the process's peak RSS (VmHWM, reset after the
imports) above its RSS right before loading, reported as a ratio to the float checkpoint's size (machines
differ, ratios travel). The float checkpoint is memory-mapped, so its pages count once touched.

    python scripts/bench_load.py                       # ~50M-parameter SD3-style transformer, fp32
    python scripts/bench_load.py --layers 4 --bits 3   # smaller/faster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path


logger = logging.getLogger("bench_load")

_CHILD = """
import json, sys, time
import torch
import diffusers_otq
from diffusers import SD3Transformer2DModel
from diffusers_otq import OTQConfig, quantize_model

import ctypes, gc

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def rss_kb():
    return status_kb("VmRSS")

mode, path, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS: imports don't count
    f.write("5")
base = rss_kb()
start = time.perf_counter()
if mode == "float":
    model = SD3Transformer2DModel.from_pretrained(path)
elif mode == "quantize-on-load":
    model = SD3Transformer2DModel.from_pretrained(path, quantization_config=OTQConfig(bits=bits))
elif mode == "post-hoc":
    model = SD3Transformer2DModel.from_pretrained(path)
    quantize_model(model, OTQConfig(bits=bits), progress=False, compute_metrics=False)
else:
    model = SD3Transformer2DModel.from_pretrained(path)
seconds = time.perf_counter() - start
peak = status_kb("VmHWM")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed scratch to the OS before measuring what stays resident
print(json.dumps({"seconds": seconds, "peak_extra_mb": (peak - base) / 1024, "final_extra_mb": (rss_kb() - base) / 1024}))
"""


def _model_config(layers: int, width: int) -> dict:
    heads = width // 64
    return {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": heads,
        "joint_attention_dim": width,
        "caption_projection_dim": width,
        "pooled_projection_dim": width,
        "out_channels": 16,
        "pos_embed_max_size": 32,
    }


def _run_child(mode: str, path: Path, bits: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path), str(bits)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from diffusers import SD3Transformer2DModel

    import diffusers_otq  # noqa: F401
    from diffusers_otq import OTQConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**_model_config(args.layers, args.width))
        params = sum(p.numel() for p in model.parameters())
        largest_mb = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)) / 2**20
        model.save_pretrained(root / "float")
        float_mb = (root / "float" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
        SD3Transformer2DModel.from_pretrained(
            root / "float", quantization_config=OTQConfig(bits=args.bits)
        ).save_pretrained(root / "quantized")
        quantized_mb = (root / "quantized" / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
        del model
        rows = []
        for mode, path in [
            ("float", root / "float"),
            ("quantize-on-load", root / "float"),
            ("post-hoc", root / "float"),
            ("pre-quantized reload", root / "quantized"),
        ]:
            result = _run_child(mode, path, args.bits)
            rows.append((mode, result))
            logger.info("%s: %s", mode, result)

    lines = [
        f"SD3Transformer2DModel, {params / 1e6:.1f}M parameters, fp32 checkpoint {float_mb:.1f} MiB, "
        f"{args.bits}-bit OTQ checkpoint {quantized_mb:.1f} MiB ({float_mb / quantized_mb:.2f}x smaller); 1 thread.",
        "",
        f"Largest layer: {largest_mb:.1f} MiB in fp32. The last column is (peak - float checkpoint) / largest layer: "
        "the working memory beyond one full-precision copy, in layers.",
        "",
        "| path | seconds | peak extra RSS (MiB) | peak / float checkpoint | resident after (MiB) | beyond one copy, in layers |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in rows:
        lines.append(
            f"| {mode} | {r['seconds']:.2f} | {r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / float_mb:.2f} | "
            f"{r['final_extra_mb']:.0f} | {(r['peak_extra_mb'] - float_mb) / largest_mb:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            f"# Loading benchmark\n\nCommand: `python scripts/bench_load.py {' '.join(sys.argv[1:])}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
