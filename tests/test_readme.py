"""The README's quickstart runs as written, in a fresh process, from an empty folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_code() -> str:
    """The first ```python block under the README's "Quickstart" heading."""
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Quickstart section has no python block"
    return match.group(1)


def test_the_readme_quickstart_quantizes_saves_reloads_and_samples(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", quickstart_code()], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = tmp_path / "dit-otq3" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert saved.is_file() and saved.stat().st_size < 0.4 * (2 * 1_424_772)  # packed: well under the fp16 size
    assert (tmp_path / "sample.png").is_file()
