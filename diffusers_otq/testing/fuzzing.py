"""Seeded mutation testing of saved OTQ checkpoints: every damaged checkpoint must load exactly or be refused.

A *mutation* copies a saved checkpoint folder and damages it one way; the *probe* then loads it with diffusers
and runs a fixed forward. Each outcome falls in one class:

* ``identical``: it loaded and the outputs equal the original's bit for bit (the damage did not matter, e.g. a
  changed space in the JSON header);
* ``refused``: loading raised :class:`~diffusers_otq.checkpoint.CheckpointError` (the contract);
* ``silent``: it loaded and the outputs differ: a silent corruption (a bug);
* ``raw``: any other exception (a bug: the user gets no cause).

Mutation kinds (the file-level ones pick one of the checkpoint's safetensors files):

``bit_flip`` one bit anywhere; ``overwrite`` 1-16 random bytes; ``truncate`` at a random length; ``append`` random
bytes; ``header_bit_flip`` one bit inside the JSON header; ``header_dtype`` / ``header_shape`` /
``header_offsets`` a rewritten entry; ``rename`` a key; ``remove`` a tensor (file rewritten consistently);
``add`` an extra tensor; ``swap`` two tensors' data of equal size; ``metadata`` a checksum, a config checksum, the
format version or the whole ``__metadata__`` edited or removed; ``config`` an edit of config.json: of its
``quantization_config`` (replaced, removed, a field changed) or of a model field (changed, removed, added);
``index`` an edit of a sharded checkpoint's index: its weight map (an entry removed, moved or added, the map
replaced by a list, a string or a map to numbers, a shard that does not exist), its metadata or weight map removed,
the whole index a list, or its JSON truncated.

Used by tests/testing/test_fuzzing.py (a few hundred mutations per CI run) and scripts/fuzz_checkpoints.py (long runs,
results/reliability.md).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError


__all__ = ["MUTATIONS", "RESULTS", "Outcome", "Probe", "classify", "count_table", "mutate", "run_campaign"]

RESULTS = ("identical", "refused", "silent", "raw")
CONFIG = "config.json"
INDEX_SUFFIX = ".safetensors.index.json"
_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U16"]
_CHECKSUM_ENTRIES = ("otq_checksums", "otq_config_checksums")
_STRINGS = ["relu", "gelu", "silu", "quick_gelu", "gated-gelu", "float16", "bfloat16", "UNet2DModel", "x", ""]


@dataclass(frozen=True)
class Outcome:
    """One mutation's result: its ``kind``, what was done (``detail``), the class and, for errors, the message."""

    kind: str
    detail: str
    result: str
    error: str = ""


@dataclass(frozen=True)
class Probe:
    """How to load a checkpoint folder and the outputs the undamaged one gives."""

    load: Callable[[Path], torch.nn.Module]
    run: Callable[[torch.nn.Module], torch.Tensor]
    expected: torch.Tensor


# --- safetensors files as (header, data) ------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _relayout(header: dict, data: bytes, keep: list[str], extra: dict[str, tuple[dict, bytes]]) -> bytes:
    """A consistent file holding ``keep`` (from ``header``/``data``) plus ``extra`` entries, densely packed."""
    tensors = {k: (header[k], data[header[k]["data_offsets"][0] : header[k]["data_offsets"][1]]) for k in keep}
    tensors.update(extra)
    out_header: dict = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    blob, offset = bytearray(), 0
    for key, (info, payload) in tensors.items():
        out_header[key] = {**info, "data_offsets": [offset, offset + len(payload)]}
        blob += payload
        offset += len(payload)
    return _join(out_header, bytes(blob))


def _tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# --- mutations --------------------------------------------------------------------------------------------------


def _bit_flip(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    position = rng.randrange(len(raw))
    bit = rng.randrange(8)
    out = bytearray(raw)
    out[position] ^= 1 << bit
    return bytes(out), f"bit {bit} of byte {position}/{len(raw)}"


def _overwrite(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    count = rng.randint(1, 16)
    start = rng.randrange(len(raw))
    out = bytearray(raw)
    for i in range(start, min(len(raw), start + count)):
        out[i] = rng.randrange(256)
    return bytes(out), f"{count} bytes at {start}/{len(raw)}"


def _truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    keep = rng.randrange(len(raw))
    return raw[:keep], f"kept {keep} of {len(raw)} bytes"


def _append(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    count = rng.randint(1, 64)
    return raw + bytes(rng.randrange(256) for _ in range(count)), f"{count} bytes appended"


def _header_bit_flip(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    (length,) = struct.unpack("<Q", raw[:8])
    position = 8 + rng.randrange(length)
    bit = rng.randrange(8)
    out = bytearray(raw)
    out[position] ^= 1 << bit
    return bytes(out), f"header bit {bit} of byte {position}: {chr(raw[position])!r} -> {chr(out[position])!r}"


def _header_dtype(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    key = rng.choice(_tensor_keys(header))
    old = header[key]["dtype"]
    header[key]["dtype"] = rng.choice([d for d in _DTYPES if d != old])
    return _join(header, data), f"{key}: dtype {old} -> {header[key]['dtype']}"


def _header_shape(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    key = rng.choice(_tensor_keys(header))
    old = list(header[key]["shape"])
    shape = list(old)
    choice = rng.randrange(4)
    if choice == 0 and len(shape) > 1:
        shape = shape[::-1]
    elif choice == 1 and shape:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice([-1, 1, 2]))
    elif choice == 2:
        shape = [*shape, 1]
    else:
        shape = [int(torch.tensor(shape).prod())] if shape else [1]
    header[key]["shape"] = shape
    return _join(header, data), f"{key}: shape {old} -> {shape}"


def _header_offsets(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    key = rng.choice(_tensor_keys(header))
    old = list(header[key]["data_offsets"])
    shift = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
    new = [old[0] + shift, old[1] + shift] if rng.random() < 0.5 else [old[0], old[1] + shift]
    header[key]["data_offsets"] = new
    return _join(header, data), f"{key}: data_offsets {old} -> {new}"


def _rename(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    key = rng.choice(_tensor_keys(header))
    i = rng.randrange(len(key))
    new_key = key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz._0123456789") + key[i + 1 :]
    header = {new_key if k == key else k: v for k, v in header.items()}
    return _join(header, data), f"{key} -> {new_key}"


def _remove(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    keys = _tensor_keys(header)
    key = rng.choice(keys)
    return _relayout(header, data, [k for k in keys if k != key], {}), f"removed {key}"


def _add(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    keys = _tensor_keys(header)
    source = rng.choice(keys)
    info = header[source]
    payload = data[info["data_offsets"][0] : info["data_offsets"][1]]
    name = rng.choice([source + "_copy", "extra.weight", source.rpartition(".")[0] + ".packed"])
    return _relayout(header, data, keys, {name: (dict(info), payload)}), f"added {name} (a copy of {source})"


def _swap(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    by_size: dict[int, list[str]] = {}
    for key in _tensor_keys(header):
        begin, end = header[key]["data_offsets"]
        by_size.setdefault(end - begin, []).append(key)
    groups = [keys for keys in by_size.values() if len(keys) > 1]
    if not groups:
        return _bit_flip(raw, rng)
    a, b = rng.sample(rng.choice(groups), 2)
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return _join(header, data), f"swapped the data of {a} and {b}"


def _metadata(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, data = _split(raw)
    metadata = dict(header.get("__metadata__") or {})
    choice = rng.randrange(6)
    if choice == 0:
        header.pop("__metadata__", None)
        detail = "removed __metadata__"
    elif choice == 1 and metadata:
        key = rng.choice(sorted(metadata))
        metadata.pop(key)
        header["__metadata__"] = metadata
        detail = f"removed metadata {key!r}"
    elif choice == 2 and any(entry in metadata for entry in _CHECKSUM_ENTRIES):
        entry = rng.choice([entry for entry in _CHECKSUM_ENTRIES if entry in metadata])
        sums = json.loads(metadata[entry])
        key = rng.choice(sorted(sums))
        sums[key] = rng.choice([sums[key] ^ 1, 0, -1, "x", None, 2**64])
        metadata[entry] = json.dumps(sums)
        header["__metadata__"] = metadata
        detail = f"{entry}: checksum of {key} -> {sums[key]!r}"
    elif choice == 3:
        value = rng.choice(["0", "2", "9", "-1", "x", "", "3.0", "²", "99999999999999999999"])
        metadata["otq_format_version"] = value
        header["__metadata__"] = metadata
        detail = f"format version -> {value!r}"
    elif choice == 4:
        metadata[rng.choice(["otq_extra", "format", *_CHECKSUM_ENTRIES])] = rng.choice(["{}", "[]", "pt", "null"])
        header["__metadata__"] = metadata
        detail = f"metadata -> {metadata}"[:120]
    else:
        return _header_bit_flip(raw, rng)
    return _join(header, data), detail


FILE_MUTATIONS: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
    "bit_flip": _bit_flip,
    "overwrite": _overwrite,
    "truncate": _truncate,
    "append": _append,
    "header_bit_flip": _header_bit_flip,
    "header_dtype": _header_dtype,
    "header_shape": _header_shape,
    "header_offsets": _header_offsets,
    "rename": _rename,
    "remove": _remove,
    "add": _add,
    "swap": _swap,
    "metadata": _metadata,
}


def _config_edit(config: dict, rng: random.Random, module_names: list[str]) -> str:
    qc = config.get("quantization_config")
    choice = rng.randrange(18)
    if choice >= 12:
        return _model_field_edit(config, rng)
    if choice == 0:
        config["quantization_config"] = rng.choice([None, [], {}, "otq", 3])
        return f"quantization_config -> {config['quantization_config']!r}"
    if choice == 1:
        config.pop("quantization_config", None)
        return "quantization_config removed"
    if not isinstance(qc, dict):
        return "no quantization_config to edit"
    field, values = rng.choice(
        [
            ("bits", [1, 2, 3, 4, 5, 8, 0, 9, -1, "3", 3.0, None, True]),
            ("granularity", ["tensor", "channel", "group", "row", None]),
            ("group_size", [None, 8, 16, 32, 64, 0, -8, "64"]),
            ("method", ["ot", "ot-vp", "uniform", "log2", "nope", None]),
            ("codebook_dtype", ["float16", "bfloat16", "float32", "int8", None]),
            ("modules_to_not_convert", [[], ["*"], None, "conv_in", [rng.choice(module_names)], [1]]),
            ("module_overrides", [{}, {rng.choice(module_names): {"bits": 2}}, {"*": {"bits": 8}}, [], None]),
            ("rank", [0, 1, 4, -1, None]),
            ("rotation_block", [0, 16, 32, None]),
            ("format_version", [1, 2, 3, 4, "3", None]),
            ("quant_method", ["bitsandbytes", "otq", None]),
            (rng.choice(sorted(qc) or ["bits"]), [None, 0, "x", [], {}]),
        ]
    )
    value = rng.choice(values)
    if value is None and rng.random() < 0.5:
        qc.pop(field, None)
        return f"quantization_config.{field} removed"
    qc[field] = value
    return f"quantization_config.{field} -> {value!r}"


def _changed(value: object, rng: random.Random) -> object:
    """Another value of the same kind, small enough that building the model stays cheap."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        candidates: list = [value + 1, value - 1, value * 2, value // 2, 0]
    elif isinstance(value, float):
        candidates = [value * 2, value / 2, value + 0.5, 0.0]
    elif isinstance(value, str):
        candidates = list(_STRINGS)
    elif isinstance(value, list):
        candidates = [value[::-1], value[:-1], [*value, *value[-1:]], [1]]
    elif isinstance(value, dict):
        candidates = [{}, {"x": 1}]
    else:
        candidates = [1, "x", [], {}]
    return rng.choice([c for c in candidates if c != value or type(c) is not type(value)])


def _model_field_edit(config: dict, rng: random.Random) -> str:
    """An edit of a config.json field that describes the model (not its quantization_config)."""
    fields = sorted(k for k in config if k != "quantization_config")
    choice = rng.randrange(6)
    if choice == 0 or not fields:
        field = rng.choice(["_name_or_path", "extra_field", "hidden_dropout", "use_return_dict"])
        config[field] = rng.choice([0, 1.5, "x", None, True])
        return f"{field} added: {config[field]!r}"
    field = rng.choice(fields)
    if choice == 1:
        config.pop(field)
        return f"{field} removed"
    old = config[field]
    config[field] = _changed(old, rng)
    return f"{field}: {old!r} -> {config[field]!r}"


def _index_edit(text: str, rng: random.Random) -> tuple[str, str]:
    """An edit of a shard index's JSON text: the new text and what was done."""
    index = json.loads(text)
    weight_map = index.get("weight_map", {})
    key = rng.choice(sorted(weight_map))
    choice = rng.randrange(10)
    if choice == 0:
        weight_map.pop(key)
        detail = f"weight_map: removed {key}"
    elif choice == 1 and len(set(weight_map.values())) > 1:
        weight_map[key] = rng.choice(sorted(set(weight_map.values()) - {weight_map[key]}))
        detail = f"weight_map: {key} -> {weight_map[key]}"
    elif choice == 2:
        weight_map[key] = rng.choice(["missing.safetensors", "../" + weight_map[key], ""])
        detail = f"weight_map: {key} -> {weight_map[key]!r}"
    elif choice == 3:
        keep = rng.randrange(len(text))
        return text[:keep], f"truncated at {keep} of {len(text)} characters"
    elif choice == 4:
        index["weight_map"] = rng.choice([[], "x", sorted(weight_map), {k: 1 for k in weight_map}, {}])
        detail = f"weight_map -> {json.dumps(index['weight_map'])[:40]}"
    elif choice == 5:
        removed = rng.choice(["metadata", "weight_map"])
        index.pop(removed, None)
        detail = f"{removed} removed"
    elif choice == 6:
        index = [index]
        detail = "the index wrapped in a list"
    elif choice == 7:
        index["metadata"] = rng.choice([None, [], "x", {}])
        detail = f"metadata -> {index['metadata']!r}"
    else:
        weight_map[key + "_extra"] = weight_map[key]
        detail = f"weight_map: added {key}_extra"
    return json.dumps(index, indent=2), detail


MUTATIONS: tuple[str, ...] = (*FILE_MUTATIONS, "config", "index")


def mutate(source: Path, target: Path, kind: str, rng: random.Random, module_names: list[str]) -> str:
    """Copy the checkpoint folder ``source`` to ``target`` and damage it with mutation ``kind``; returns a detail."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    if kind == "config":
        path = target / CONFIG
        config = json.loads(path.read_text())
        detail = _config_edit(config, rng, module_names)
        path.write_text(json.dumps(config, indent=2))
        return detail
    if kind == "index":
        indexes = sorted(target.glob("*" + INDEX_SUFFIX))
        if not indexes:
            kind = rng.choice(list(FILE_MUTATIONS))
        else:
            text, detail = _index_edit(indexes[0].read_text(), rng)
            indexes[0].write_text(text)
            return detail
    files = sorted(target.glob("*.safetensors"))
    path = rng.choice(files)
    raw, detail = FILE_MUTATIONS[kind](path.read_bytes(), rng)
    path.write_bytes(raw)
    return f"{path.name}: {detail}" if len(files) > 1 else detail


def classify(probe: Probe, folder: Path, kind: str, detail: str) -> Outcome:
    """Load ``folder`` with ``probe`` and classify the outcome (see the module docstring)."""
    try:
        model = probe.load(folder)
        with torch.no_grad():
            out = probe.run(model)
    except CheckpointError as error:
        return Outcome(kind, detail, "refused", str(error).splitlines()[0][:200])
    except Exception as error:  # noqa: BLE001 - every other exception is what the fuzzer looks for
        return Outcome(
            kind, detail, "raw", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        )
    if out.shape == probe.expected.shape and torch.equal(out, probe.expected):
        return Outcome(kind, detail, "identical")
    return Outcome(kind, detail, "silent")


def run_campaign(
    source: Path, probe: Probe, count: int, seed: int, module_names: list[str], workdir: Path
) -> list[Outcome]:
    """``count`` seeded mutations of the checkpoint folder ``source``, the kinds taken in turn; their outcomes.

    The same ``seed`` gives the same mutations (the damaged copy is rebuilt in ``workdir / "mutated"`` each time).
    """
    rng = random.Random(seed)
    outcomes = []
    for i in range(count):
        kind = MUTATIONS[i % len(MUTATIONS)]
        detail = mutate(source, workdir / "mutated", kind, rng, module_names)
        outcomes.append(classify(probe, workdir / "mutated", kind, detail))
    return outcomes


def count_table(outcomes: list[Outcome]) -> list[str]:
    """A markdown table: one row per mutation kind, one column per result class, and a total row."""
    lines = ["| mutation | " + " | ".join(RESULTS) + " | total |", "|---|" + "---|" * (len(RESULTS) + 1)]
    for kind in [*MUTATIONS, None]:
        chosen = [o for o in outcomes if kind is None or o.kind == kind]
        if not chosen:
            continue
        cells = [str(sum(o.result == r for o in chosen)) for r in RESULTS]
        lines.append(f"| {kind or '**all**'} | " + " | ".join(cells) + f" | {len(chosen)} |")
    return lines
