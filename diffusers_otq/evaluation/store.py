"""JSONL result rows: one file per process while running, merged into ``results.jsonl`` by the main process.

A row is one ``(model, method, granularity, bits, scope, metric_set, seed)`` cell (:func:`row_key`). Each
process appends its rows to ``rows/rank<i>.jsonl`` and flushes after every row, so a killed run loses at most
the cell in progress; :meth:`ResultStore.done_keys` reads every shard and the merged file, so a rerun with
any number of processes skips finished cells. :meth:`ResultStore.merge` writes ``results.jsonl`` sorted by key,
so its content does not depend on how the work was sharded.

On disk a weights row's per-layer list ``metrics["layers"]`` (one ``{"name", "numel", "rel_mse", "w2", ...}``
dict per tensor) is stored column-wise with floats rounded to :data:`LAYER_DIGITS` significant digits, which
keeps a full run's ``results.jsonl`` a few MB; :func:`read_jsonl` turns it back into the list of dicts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path


__all__ = ["KEY_FIELDS", "ResultStore", "read_jsonl", "row_key"]

KEY_FIELDS: tuple[str, ...] = ("model", "method", "granularity", "bits", "scope", "metric_set", "seed")
MERGED_NAME = "results.jsonl"
LAYER_DIGITS = 4  # significant digits of per-layer floats on disk (the report prints at most 4)
_COLUMNS = "columns"


def row_key(row: dict) -> str:
    """``"model|method|granularity|bits|scope|metric_set|seed"``."""
    missing = [field for field in KEY_FIELDS if field not in row]
    if missing:
        raise ValueError(f"result row lacks the key field(s) {missing}; every row needs {list(KEY_FIELDS)}.")
    return "|".join(str(row[field]) for field in KEY_FIELDS)


def _clean(value: object) -> object:
    """NaN/inf become None so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _round(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.{LAYER_DIGITS}g}")
    return value


def _encode_layers(row: dict) -> dict:
    """The row with ``metrics["layers"]`` (a list of dicts) as ``{"columns": {field: [values...]}}``.

    A field missing from some layers (``skipped`` on peers' layers) is ``null`` there; floats are rounded to
    :data:`LAYER_DIGITS` significant digits. Rows without a layer list, or already encoded, come back unchanged.
    """
    layers = row.get("metrics", {}).get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        return row
    fields = list(dict.fromkeys(field for layer in layers for field in layer))
    columns = {field: [_round(layer.get(field)) for layer in layers] for field in fields}
    return {**row, "metrics": {**row["metrics"], "layers": {_COLUMNS: columns}}}


def _decode_layers(row: dict) -> dict:
    """Inverse of :func:`_encode_layers`: one dict per layer, without the fields that are ``null`` there."""
    metrics = row.get("metrics")
    layers = metrics.get("layers") if isinstance(metrics, dict) else None
    if not (isinstance(layers, dict) and isinstance(layers.get(_COLUMNS), dict)):
        return row
    columns = layers[_COLUMNS]
    count = max((len(values) for values in columns.values()), default=0)
    decoded = [
        {field: values[i] for field, values in columns.items() if i < len(values) and values[i] is not None}
        for i in range(count)
    ]
    return {**row, "metrics": {**metrics, "layers": decoded}}


def _dumps(row: dict) -> str:
    return json.dumps(_encode_layers(row), sort_keys=True)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object raises ValueError naming the file and line.

    Column-wise per-layer lists (see the module docstring) come back as one dict per layer.
    """
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if not line.endswith("\n"):  # the unfinished last line of a shard whose writer was killed
                    break
                raise ValueError(f"{path}:{number} is not valid JSON ({err}); delete that line and rerun.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is not a JSON object; delete that line and rerun.")
            rows.append(_decode_layers(row))
    return rows


class ResultStore:
    """The results of one output directory, as seen by process ``rank``.

    Args:
        output_dir: where ``results.jsonl`` and ``rows/`` live (created).
        rank: this process's index (its shard file is ``rows/rank<rank>.jsonl``).
    """

    def __init__(self, output_dir: Path, rank: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.shard_dir = self.output_dir / "rows"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.shard_path = self.shard_dir / f"rank{rank}.jsonl"

    def rows(self) -> list[dict]:
        """Every finished row, deduplicated by key (later files win, but never an error over an ok row), sorted."""
        by_key: dict[str, dict] = {}
        merged = self.output_dir / MERGED_NAME
        for path in [merged, *sorted(self.shard_dir.glob("rank*.jsonl"))]:
            if path.is_file():
                for row in read_jsonl(path):
                    key = row_key(row)
                    if row.get("status") == "error" and by_key.get(key, {}).get("status") == "ok":
                        continue
                    by_key[key] = row
        return [by_key[key] for key in sorted(by_key)]

    def done_keys(self) -> set[str]:
        """Keys of rows that finished with status ok or a permanent status (unavailable, not-applicable)."""
        return {row_key(row) for row in self.rows() if row.get("status", "ok") != "error"}

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows (each gets its ``key``) to this process's shard, flushed to disk."""
        with open(self.shard_path, "a", encoding="utf-8") as handle:
            for row in rows:
                row = dict(_clean(row))  # type: ignore[arg-type]
                row["key"] = row_key(row)
                handle.write(_dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self) -> Path:
        """Write ``results.jsonl`` (all rows, sorted by key) atomically; returns its path."""
        merged = self.output_dir / MERGED_NAME
        tmp = merged.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in self.rows():
                handle.write(_dumps(row) + "\n")
        os.replace(tmp, merged)
        return merged
