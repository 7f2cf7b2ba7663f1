"""Model cards and Hub uploads for OTQ-quantized models and pipelines.

The card is rendered from ``diffusers_otq/model_cards/otq_quantized.md`` (package data) with YAML metadata (``library_name: diffusers``, ``base_model``, tags
``quantized``, ``otq``, ``flow-matching``, ``<b>-bit``), the quantization config, the measured bits per weight,
the size on disk against the 16-bit size, and loading code that starts with ``import diffusers_otq``.

Three ways to upload, all with this card (a real push needs a Hub login: ``hf auth login`` or ``token=``):

* :func:`push_to_hub` for any model or pipeline;
* ``model.push_to_hub(repo)`` and ``model.save_pretrained(dir, push_to_hub=True)`` on a model quantized by
  diffusers-otq: :func:`attach_model_card` makes that model's upload step write our card over the generic one
  diffusers just saved;
* ``FlowMatchPipeline.push_to_hub`` / ``save_pretrained(push_to_hub=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import types
from collections import Counter
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .layers import OTQLayerMixin


__all__ = ["attach_model_card", "detach_model_card", "model_card", "push_to_hub", "write_model_card", "TEMPLATE_NAME"]

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "otq_quantized.md"


def _template_path() -> Path:
    """The card template, package data (``diffusers_otq/model_cards/``)."""
    return Path(__file__).resolve().parent / "model_cards" / TEMPLATE_NAME


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover


def _components(obj: Any) -> dict[str, nn.Module]:
    """``{name: module}``: the object itself for a model, its torch components for a pipeline."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    return {name: c for name, c in getattr(obj, "components", {}).items() if isinstance(c, nn.Module)}


def _quantization_configs(components: dict[str, nn.Module]) -> dict[str, dict]:
    configs = {}
    for name, module in components.items():
        config = getattr(module, "config", None)
        qc = config.get("quantization_config") if hasattr(config, "get") else None
        if qc is not None:
            configs[name] = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    return configs


def _usage(obj: Any, repo_id: str) -> str:
    cls = type(obj)
    import diffusers

    module = "diffusers" if getattr(diffusers, cls.__name__, None) is cls else cls.__module__.split(".")[0]
    var = "model" if isinstance(obj, nn.Module) else "pipe"
    # A JSON string is a valid Python string literal: whatever the id holds, a quote in it cannot end the string
    literal = json.dumps(str(repo_id))
    return f"from {module} import {cls.__name__}\n\n{var} = {cls.__name__}.from_pretrained({literal})"


def model_card(obj: Any, save_directory: str | os.PathLike, repo_id: str, base_model: str | None = None) -> ModelCard:
    """Render the OTQ model card for ``obj`` (a model or pipeline) saved in ``save_directory``.

    Args:
        obj: the quantized ``ModelMixin`` or ``DiffusionPipeline``.
        save_directory: where it was saved; the size on disk is measured there (every ``*.safetensors`` below it).
        repo_id: the Hub repository the loading code refers to.
        base_model: the Hub id of the original model; default: the model's ``_name_or_path`` when it looks like
            a Hub id (``owner/name``, not a local path).
    """
    components = _components(obj)
    layers = [m for c in components.values() for m in c.modules() if isinstance(m, OTQLayerMixin)]
    quantized_numel = sum(m.weight_shape.numel() for m in layers)
    quantized_bytes = sum(m.nbytes for m in layers)
    float_numel = sum(
        t.numel() for c in components.values() for t in (*c.parameters(), *c.buffers()) if t.is_floating_point()
    )
    float_numel -= sum(b.numel() for m in layers for b in m.buffers() if b.is_floating_point())
    size_16bit = 2 * (float_numel + quantized_numel)
    on_disk = sum(p.stat().st_size for p in Path(save_directory).rglob("*.safetensors"))
    configs = _quantization_configs(components)
    bits = sorted({c.get("bits") for c in configs.values()} | {m.bits for m in layers})
    if base_model is None:
        name = str(getattr(obj, "name_or_path", "") or getattr(getattr(obj, "config", {}), "_name_or_path", "") or "")
        base_model = name if name.count("/") == 1 and not os.path.exists(name) else None
    card_data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=["quantized", "otq", "diffusers-otq", "flow-matching", *(f"{b}-bit" for b in bits)],
    )
    shown_configs = configs.get("", configs)
    provenance = _provenance(configs)
    settings = [(name, _setting(m)) for c in components.values() for name, m in c.named_modules()
                if isinstance(m, OTQLayerMixin)]  # fmt: skip
    mixed = len({setting for _, setting in settings}) > 1
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_path()),
        title=f"{repo_id.rsplit('/', 1)[-1]} ({'/'.join(map(str, bits))}-bit OTQ)",
        kind="model" if isinstance(obj, nn.Module) else "pipeline",
        bits_label="/".join(f"{b}-bit" for b in bits),
        base_model=base_model,
        quantized_layers=len(layers),
        quantized_parameters=f"{quantized_numel:,}",
        bits_per_weight=f"{quantized_bytes * 8 / max(quantized_numel, 1):.3f}",
        size_on_disk=_human_bytes(on_disk),
        size_16bit=_human_bytes(size_16bit),
        compression=f"{size_16bit / max(on_disk, 1):.2f}x smaller than 16-bit",
        usage=_usage(obj, repo_id),
        quantization_config=json.dumps(shown_configs, indent=2, sort_keys=True),
        calibration=_calibration_text(provenance.get("calibration")),
        budget=_budget_text(provenance.get("bits_per_weight")),
        structure=_structure_text(layers),
        refinement=_refinement_text(provenance.get("refinement")),
        settings=settings if mixed else [],
        settings_summary=", ".join(f"{n} x {s}" for s, n in sorted(Counter(s for _, s in settings).items())),
    )


def _provenance(configs: dict[str, dict]) -> dict:
    """The first quantization config's ``provenance`` record (calibration, bits budget), or {}."""
    for config in configs.values():
        if isinstance(config, dict) and isinstance(config.get("provenance"), dict):
            return config["provenance"]
    return {}


def _setting(layer: OTQLayerMixin) -> str:
    text = f"{layer.bits}-bit {layer.granularity}"
    text += f" {layer.group_size}" if layer.group_size else ""
    text += f" {layer.vector_dim}-D" if layer.vector_dim > 1 else ""
    text += f" + rank {layer.rank}" if layer.rank else ""
    return text + (" rotated" if layer.rotation_block else "")


def _structure_text(layers: list[OTQLayerMixin]) -> str:
    """Which layers carry a low-rank branch or an input rotation (counted in the bits per weight), or ""."""
    ranks = Counter(m.rank for m in layers if m.rank)
    rotated = sum(1 for m in layers if m.rotation_block)
    parts = [f"{n} layer(s) with a rank-{r} 16-bit branch" for r, n in sorted(ranks.items())]
    if rotated:
        parts.append(f"{rotated} layer(s) with a randomized Hadamard input rotation")
    return "; ".join(parts)


def _refinement_text(record: dict | None) -> str:
    if not record:
        return ""
    if record.get("scope") == "sequential blocks":
        text = (
            f"{record.get('steps_per_block')} Adam steps (lr {record.get('lr')}) per block on the full-precision "
            f"model's block outputs along the calibration trajectories, {record.get('blocks')} blocks in turn; mean "
            f"relative block error {record['loss_before']:.4g} -> {record['loss_after']:.4g}"
        )
        return text + (f" (stopped early: {record['stopped']})" if record.get("stopped") else "")
    target = "velocity" if record.get("guidance") is None else f"guided velocity (guidance {record['guidance']})"
    if record.get("scope") == "blocks":
        target = f"block outputs, {record.get('blocks')} blocks one at a time,"
    text = (
        f"{record['steps']} Adam steps (lr {record.get('lr')}) on the full-precision model's {target} along "
        f"{record.get('samples')} sampled trajectories; teacher loss {record['loss_before']:.4g} -> "
        f"{record['loss_after']:.4g}"
    )
    if (record.get("noise_bands") or 1) > 1:
        text += (
            f"; {record['noise_bands']} sets of codebooks, one per noise-level band, each trained on its band's calls"
        )
    return text + (f" (stopped early: {record['stopped']})" if record.get("stopped") else "")


def _calibration_text(record: dict | None) -> str:
    if not record:
        return ""
    parts = [f"{record.get('num_batches')} batches from {record.get('source', 'samples')}"]
    if record.get("num_inference_steps"):
        parts.append(f"{record['num_inference_steps']} steps")
    stages = ["activation-weighted codebooks"]
    if record.get("error_feedback"):
        stages.append(f"error feedback with {record.get('refit_rounds')} codebook refits")
    if record.get("bias_correction"):
        stages.append("bias correction")
    if record.get("sequential"):
        stages.append(f"block by block ({record.get('blocks')} blocks, each fed {record.get('block_inputs')} inputs)")
    return ", ".join(parts) + "; " + ", ".join(stages)


def _budget_text(record: dict | None) -> str:
    if not record:
        return ""
    return f"{record['budget']} bits/weight requested, {record['reached']:.3f} reached ({record['sensitivity']} sensitivity)"


def write_model_card(
    obj: Any, save_directory: str | os.PathLike, repo_id: str | None = None, base_model: str | None = None
) -> Path:
    """Write the OTQ card as ``save_directory/README.md`` (repo id defaults to the folder name); returns the path."""
    repo_id = repo_id or Path(save_directory).resolve().name
    path = Path(save_directory, "README.md")
    model_card(obj, save_directory, repo_id, base_model).save(str(path))
    return path


def push_to_hub(
    obj: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    max_shard_size: str | int | None = None,
) -> Any:
    """Save ``obj`` (a quantized model or pipeline) with its OTQ model card and upload it to ``repo_id``.

    Needs a Hub login (``hf auth login``) or ``token``. Returns ``huggingface_hub.upload_folder``'s result.
    """
    repo_id = huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmpdir:
        save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        obj.save_pretrained(tmpdir, **save_kwargs)
        write_model_card(obj, tmpdir, repo_id, base_model)
        return huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=tmpdir,
            token=token,
            commit_message=commit_message or f"Upload OTQ-quantized {type(obj).__name__}",
            create_pr=create_pr,
        )


def _upload_folder_with_card(
    self: Any,
    working_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    subfolder: str | None = None,
) -> Any:
    """Replacement for ``PushToHubMixin._upload_folder``: write the OTQ card, then upload as diffusers does."""
    if not subfolder:  # diffusers writes no card for subfolder pushes either
        write_model_card(self, working_dir, repo_id)
    return type(self)._upload_folder(
        self,
        working_dir,
        repo_id,
        token=token,
        commit_message=commit_message,
        create_pr=create_pr,
        subfolder=subfolder,
    )


def attach_model_card(model: nn.Module) -> None:
    """Make ``model.push_to_hub`` and ``save_pretrained(push_to_hub=True)`` upload the OTQ card (this instance only)."""
    if hasattr(type(model), "_upload_folder"):
        model._upload_folder = types.MethodType(_upload_folder_with_card, model)


def detach_model_card(model: nn.Module) -> None:
    """Undo :func:`attach_model_card` (after dequantizing)."""
    model.__dict__.pop("_upload_folder", None)
