"""The JSONL result store: per-process shards, resume keys, deterministic merge."""

from __future__ import annotations

import json
import math

import pytest

from diffusers_otq.evaluation.store import ResultStore, read_jsonl, row_key


def _row(method: str, bits: int, status: str = "ok", value: float = 1.0) -> dict:
    return {
        "model": "m",
        "method": method,
        "granularity": "channel",
        "bits": bits,
        "scope": "deploy",
        "metric_set": "weights",
        "seed": 0,
        "status": status,
        "metrics": {"x": value},
    }


def test_shards_merge_sorted_and_independent_of_rank_assignment(tmp_path):
    rows = [_row("ot", b) for b in (2, 3, 4, 5)]
    one, two = tmp_path / "one", tmp_path / "two"
    ResultStore(one, 0).append(rows)
    ResultStore(two, 0).append(rows[1::2])
    ResultStore(two, 1).append(rows[0::2])
    assert ResultStore(one).merge().read_text() == ResultStore(two).merge().read_text()
    merged = read_jsonl(one / "results.jsonl")
    assert [r["key"] for r in merged] == sorted(row_key(r) for r in rows)


def test_done_keys_skip_errors_and_ok_wins(tmp_path):
    store = ResultStore(tmp_path, 1)
    store.append([_row("ot", 2), _row("ot", 3, status="error")])
    assert store.done_keys() == {row_key(_row("ot", 2))}
    ResultStore(tmp_path, 2).append([_row("ot", 3, value=7.0)])
    ResultStore(tmp_path, 3).append([_row("ot", 3, status="error")])  # a later failure does not hide the ok row
    by_key = {r["key"]: r for r in store.rows()}
    assert by_key[row_key(_row("ot", 3))]["metrics"]["x"] == 7.0


def test_nan_is_stored_as_null_and_truncated_last_line_is_ignored(tmp_path):
    store = ResultStore(tmp_path, 0)
    store.append([_row("ot", 2, value=math.nan)])
    with open(store.shard_path, "a") as handle:
        handle.write('{"model": "m", "meth')  # a writer killed mid-line
    rows = store.rows()
    assert len(rows) == 1 and rows[0]["metrics"]["x"] is None


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row("ot", 2)) + "\nnot json\n" + json.dumps(_row("ot", 3)) + "\n")
    with pytest.raises(ValueError, match="rows.jsonl:2"):
        read_jsonl(path)


def test_row_key_needs_all_fields():
    with pytest.raises(ValueError, match="seed"):
        row_key({k: v for k, v in _row("ot", 2).items() if k != "seed"})


def _layers_row(method: str) -> dict:
    row = _row(method, 3)
    row["metrics"]["layers"] = [
        {"name": "conv_in.weight", "numel": 288, "rel_mse": 0.023178075056206632, "w2": 0.009345498242335774},
        {"name": "proj.weight", "numel": 4096, "rel_mse": 1.0, "w2": 2.5e-05, "skipped": True},
    ]
    return row


def test_layer_lists_are_stored_column_wise_and_read_back_as_dicts(tmp_path):
    store = ResultStore(tmp_path, 0)
    store.append([_layers_row("ot")])
    stored = json.loads(store.shard_path.read_text())
    assert stored["metrics"]["layers"] == {
        "columns": {
            "name": ["conv_in.weight", "proj.weight"],
            "numel": [288, 4096],
            "rel_mse": [0.02318, 1.0],
            "w2": [0.009345, 2.5e-05],
            "skipped": [None, True],
        }
    }
    (row,) = store.rows()
    assert row["metrics"]["layers"] == [
        {"name": "conv_in.weight", "numel": 288, "rel_mse": 0.02318, "w2": 0.009345},
        {"name": "proj.weight", "numel": 4096, "rel_mse": 1.0, "w2": 2.5e-05, "skipped": True},
    ]
    merged = read_jsonl(store.merge())
    assert merged == [row]


def test_shards_written_with_per_layer_dicts_still_read(tmp_path):
    """Shards written before the column-wise layout (a list of dicts per row) load and merge unchanged."""
    store = ResultStore(tmp_path, 0)
    legacy = dict(_layers_row("ot"), key=row_key(_row("ot", 3)))
    store.shard_path.write_text(json.dumps(legacy) + "\n")
    (row,) = store.rows()
    assert row["metrics"]["layers"] == legacy["metrics"]["layers"]
    assert "columns" in json.loads(store.merge().read_text())["metrics"]["layers"]


def test_a_budget_row_keeps_its_float_bits_and_key_through_the_store(tmp_path):
    budget = {**_row("ot-vp+cal", 2), "granularity": "mixed", "bits": 2.0}  # a 2.0 bits/weight budget
    code = _row("ot-vp+cal", 2)  # 2-bit codes: another cell
    store = ResultStore(tmp_path, 0)
    store.append([budget, code])
    merged = read_jsonl(store.merge())
    assert [r["key"] for r in merged] == [
        "m|ot-vp+cal|channel|2|deploy|weights|0",
        "m|ot-vp+cal|mixed|2.0|deploy|weights|0",
    ]
    assert isinstance(merged[1]["bits"], float) and store.done_keys() == {row_key(budget), row_key(code)}
