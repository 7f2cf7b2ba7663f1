"""Quantized variants of a denoiser for the evaluation grid: our methods in two scopes, and the peers' formats.

A :class:`Variant` names one point of the grid. :func:`quantize_variant` turns a full-precision denoiser into
that variant in place and measures what it stored:

* ``scope="deploy"`` with one of our methods: exactly what ``OTQConfig`` does (packed OTQ layers for every
  ``nn.Linear``/``nn.Conv2d`` weight, via :func:`diffusers_otq.quantize_model`).
* ``scope="deploy"`` with a calibrated method (:data:`CALIBRATED`: ``ot-vp+aw``, ``ot-vp+ef``, ``ot-vp+cal``):
  the ``ot-vp`` fitter on the model's calibration statistics (:func:`diffusers_otq.calibrate`), with the fit
  switches of :class:`CalibratedFit`; same packed layers. The calibrated peer ``gptq-uniform``
  (:data:`CALIBRATED_PEERS`: GPTQ's uniform grid with error feedback on the same statistics) runs the same way,
  its bits counted in GPTQ's own format.
* ``granularity="mixed"`` (deploy scope, our methods): ``bits`` is a bits/weight *budget* (a float, e.g. 2.5),
  and :func:`diffusers_otq.quantize_model` with ``OTQConfig(bits_per_weight=bits)`` chooses per-layer bits and
  granularity under it (every code, codebook and scale counted), from the statistics for calibrated methods
  and data-free otherwise.
* ``scope="paper"`` with one of our methods: what the source paper's scripts do, fake quantization of *every*
  floating tensor of the state dict (biases, norms and embeddings too) with float32 codebooks; tensors with
  ``ndim >= 2`` get the variant's granularity, 1-D tensors one codebook each.
* a peer format (``granularity="native"``, deploy scope only): the peer library's own quantize/dequantize
  (:mod:`diffusers_otq.evaluation.peers`) applied to the same Linear/Conv2d weights, viewed as
  ``(out, in * kh * kw)``. Weights a format cannot store stay in full precision, counted at 16 bits.

Effective bits/weight count every stored byte (codes, codebooks, scales) over the quantized set of weights;
``model_bytes`` adds everything left in float at 16 bits (the bundled models ship in fp16).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ..calibration import CalibrationConfig, CalibrationStatistics, CandidateTable, TeacherCalls
from ..config import OTQConfig
from ..convert import plan_layers
from ..functional.fitters import METHODS
from ..functional.metrics import relative_mse, wasserstein2
from ..options import setting_label
from ..quantized_tensor import quantize_tensor
from .gguf import GGUF_FORMATS, gguf_quantize
from .peers import PEER_FORMATS, PeerNotApplicable, peer_format


__all__ = [
    "CALIBRATED",
    "EVAL_METHODS",
    "CALIBRATED_PEERS",
    "FAMILIES",
    "NATIVE_METADATA_BITS",
    "MIXED",
    "MIXED_METHODS",
    "SCOPES",
    "CalibratedFit",
    "Variant",
    "family_of",
    "otq_config",
    "quantize_variant",
]


@dataclass(frozen=True)
class CalibratedFit:
    """How a calibrated method fits: the codebook ``fitter`` and the :class:`~diffusers_otq.CalibrationConfig`
    switches (activation-weighted codebooks are always on; a calibrated fit without statistics does not exist)."""

    fitter: str
    error_feedback: bool
    bias_correction: bool
    refine: bool = False  # then train against the fp velocity (base.refine_steps, or REFINE_STEPS)
    refit_codebooks: bool = True  # False: the stage-1 codebook (a uniform grid for GPTQ) is never refitted
    noise_bands: int = 1  # sets of codebooks per noise-level band, refined apart (CalibrationConfig.noise_bands)
    refine_steps: int | None = None  # refinement steps; None: base.refine_steps, or REFINE_STEPS
    refine_samples: int | None = None  # teacher trajectories (CalibrationConfig.refine_samples); None: the base's
    refine_eval_every: int | None = None  # steps between teacher-loss measurements; None: the base's

    def calibration(self, base: CalibrationConfig) -> CalibrationConfig:
        """``base`` (sampling sizes, seed, damping, ...) with this method's fit switches."""
        steps = (self.refine_steps or base.refine_steps or REFINE_STEPS) if self.refine else 0
        return replace(
            base,
            refine_samples=self.refine_samples or base.refine_samples,
            refine_eval_every=self.refine_eval_every or base.refine_eval_every,
            error_feedback=self.error_feedback,
            bias_correction=self.bias_correction,
            refine_steps=steps,
            refit_codebooks=self.refit_codebooks,
            noise_bands=self.noise_bands,
            sequential=base.sequential and self.noise_bands == 1,  # bands train the whole model at once
        )


SCOPES: tuple[str, ...] = ("deploy", "paper")
OURS: tuple[str, ...] = ("ot", "ot-vp")
REFINE_STEPS = 600  # refinement steps (of 8 rows) of ot-vp+ref unless the evaluation's calibration section sets
# others (its refine_steps)
# The calibration ablation, in order: activation-weighted codebooks only, + error feedback, + bias correction,
# + refinement against the full-precision velocity (codes frozen).
CALIBRATED: dict[str, CalibratedFit] = {
    "ot-vp+aw": CalibratedFit("ot-vp", error_feedback=False, bias_correction=False),
    "ot-vp+ef": CalibratedFit("ot-vp", error_feedback=True, bias_correction=False),
    "ot-vp+cal": CalibratedFit("ot-vp", error_feedback=True, bias_correction=True),  # CalibrationConfig() defaults
    "ot-vp+ref": CalibratedFit("ot-vp", error_feedback=True, bias_correction=True, refine=True),
    # + two sets of codebooks over the same codes, one per half of the teacher's timesteps (diffusers_otq.noise_bands)
    "ot-vp+bands": CalibratedFit("ot-vp", error_feedback=True, bias_correction=True, refine=True, noise_bands=2),
    # + a teacher of 128 trajectories instead of 32 and twice the steps (results/two-bit.md section 3g: neither pays
    # alone); its loss, over 4 times the calls, measured every 600 steps instead of 100
    "ot-vp+ref+t128": CalibratedFit(
        "ot-vp",
        error_feedback=True,
        bias_correction=True,
        refine=True,
        refine_steps=1200,
        refine_samples=128,
        refine_eval_every=600,
    ),
}
CALIBRATED_PEERS: dict[str, CalibratedFit] = {
    # GPTQ (Frantar et al. 2210.17323) on the same statistics: a min-max uniform grid per output channel (or per
    # group), the act-order error-feedback sweep, no codebook refits, no bias correction. Its bits are counted in
    # GPTQ's own format (codes plus a 16-bit scale and zero per row or group, NATIVE_METADATA_BITS), not in the
    # codebook layout it is stored in here.
    "gptq-uniform": CalibratedFit("uniform", error_feedback=True, bias_correction=False, refit_codebooks=False),
}
NATIVE_METADATA_BITS: dict[str, int] = {"gptq-uniform": 32}
"""Bits of metadata per row (or group) in a calibrated peer's own format."""
CALIBRATED.update(CALIBRATED_PEERS)
EVAL_METHODS: tuple[str, ...] = (*METHODS, *CALIBRATED, *GGUF_FORMATS)  # every method name a block may list
MIXED = "mixed"  # the granularity of a bits-budget variant (per-layer bits and granularity chosen by the allocator)
MIXED_METHODS: tuple[str, ...] = (*OURS, *(m for m in CALIBRATED if m not in CALIBRATED_PEERS))  # under budgets
FAMILIES: dict[str, str] = {
    m: "otq" if m in MIXED_METHODS else "calibrated-peer" if m in (*CALIBRATED_PEERS, *GGUF_FORMATS) else "paper"
    for m in EVAL_METHODS
}
_FLOAT_BITS = 16  # what an unquantized float weight costs in the shipped (fp16) models


def family_of(method: str) -> str:
    """``"otq"`` for ot, ``"paper"`` for the paper's methods, ``"peer"`` for peer formats, ``"reference"`` for fp."""
    if method == "fp":
        return "reference"
    if method in FAMILIES:
        return FAMILIES[method]
    if method in PEER_FORMATS:
        return "peer"
    raise ValueError(
        f"method={method!r} is neither one of ours {list(FAMILIES)}, a peer format {list(PEER_FORMATS)} nor 'fp'."
    )


@dataclass(frozen=True)
class Variant:
    """One grid point: ``method`` at ``bits`` with ``granularity`` in ``scope`` (``group_size`` for groups).

    ``bits`` is the code width (an int) except for ``granularity="mixed"``, where it is the bits/weight budget
    (stored as a float, so the row key reads e.g. ``2.0`` or ``2.5`` and never collides with a code width).
    """

    method: str
    granularity: str
    bits: int | float
    scope: str = "deploy"
    group_size: int = 64

    def __post_init__(self) -> None:
        family = family_of(self.method)
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} is unknown; expected one of {list(SCOPES)}.")
        if self.calibrated and self.scope != "deploy":
            raise ValueError(
                f"{self.method!r} is calibrated on the Linear/Conv2d inputs of the deploy format and has no "
                f"scope={self.scope!r} variant; use scope='deploy' (or the data-free 'ot-vp' in the paper scope)."
            )
        if self.mixed:
            if self.method not in MIXED_METHODS or self.scope != "deploy":
                raise ValueError(
                    f"granularity='mixed' (a bits budget) runs our methods {list(MIXED_METHODS)} in the deploy scope "
                    f"only, got method={self.method!r}, scope={self.scope!r}."
                )
            if isinstance(self.bits, bool) or not isinstance(self.bits, int | float) or not 0 < self.bits <= 32:
                raise ValueError(
                    f"a mixed variant's bits is its bits/weight budget in (0, 32], got bits={self.bits!r}; e.g. 2.5."
                )
            object.__setattr__(self, "bits", float(self.bits))  # one key per budget: 3 and 3.0 are the same
        elif isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(
                f"bits={self.bits!r} must be an int code width for granularity={self.granularity!r}; for a "
                "bits/weight budget use granularity='mixed'."
            )
        if family == "peer" and (self.scope != "deploy" or self.granularity != "native"):
            raise ValueError(
                f"peer format {self.method!r} runs with granularity='native' in the deploy scope only, got "
                f"granularity={self.granularity!r}, scope={self.scope!r}."
            )
        if family == "peer" and self.bits != peer_format(self.method).bits:
            raise ValueError(
                f"{self.method!r} stores {peer_format(self.method).bits}-bit codes, not bits={self.bits}."
            )
        if self.method in GGUF_FORMATS and (
            self.granularity != "native" or self.bits != GGUF_FORMATS[self.method].bits
        ):
            raise ValueError(
                f"GGUF format {self.method!r} runs with granularity='native' and bits={GGUF_FORMATS[self.method].bits}, "
                f"got granularity={self.granularity!r}, bits={self.bits}."
            )

    @property
    def calibrated(self) -> bool:
        """Whether this variant is fitted on calibration statistics (one of :data:`CALIBRATED`, or a GGUF format:
        its importance matrix)."""
        return self.method in CALIBRATED or self.method in GGUF_FORMATS

    @property
    def mixed(self) -> bool:
        """Whether ``bits`` is a bits/weight budget spent by the allocator (``granularity="mixed"``)."""
        return self.granularity == MIXED

    @property
    def fitter(self) -> str:
        """The codebook fitter (``OTQConfig.method``): ``ot-vp`` for the calibrated methods, else ``method``."""
        return CALIBRATED[self.method].fitter if self.method in CALIBRATED else self.method


def _layer_row(name: str, original: torch.Tensor, quantized: torch.Tensor) -> dict:
    return {
        "name": name,
        "numel": original.numel(),
        "rel_mse": relative_mse(original, quantized),
        "w2": wasserstein2(original, quantized),
    }


def _summary(layers: list[dict], stored_bits: float, quantized_numel: int, float_numel: int, seconds: float) -> dict:
    finite = [row for row in layers if math.isfinite(row["rel_mse"])]
    weights = sum(row["numel"] for row in finite) or 1
    return {
        "bits_per_weight": stored_bits / quantized_numel if quantized_numel else math.nan,
        "model_bytes": int(math.ceil((stored_bits + float_numel * _FLOAT_BITS) / 8)),
        "quantize_s": seconds,
        "quantized_layers": sum(1 for row in layers if not row.get("skipped")),
        "skipped_layers": sum(1 for row in layers if row.get("skipped")),
        "rel_mse_mean": sum(row["rel_mse"] * row["numel"] for row in finite) / weights,
        "w2_mean": sum(row["w2"] for row in finite) / max(len(finite), 1),
        "layers": layers,
    }


def otq_config(variant: Variant) -> OTQConfig:
    """The ``OTQConfig`` of a deploy-scope variant of ours.

    A mixed variant gets ``bits_per_weight`` and a group base granularity: that only carries ``group_size`` into
    the allocator's group candidates (every layer is then pinned by the plan's ``module_overrides``).
    """
    if variant.mixed:
        return OTQConfig(
            method=variant.fitter,
            granularity="group",
            group_size=variant.group_size,
            bits_per_weight=variant.bits,
        )
    group = variant.granularity == "group"
    return OTQConfig(
        bits=variant.bits,
        method=variant.fitter,
        granularity=variant.granularity,
        group_size=variant.group_size if group else None,
    )


def _layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float copies of the Linear/Conv2d weights the deploy scope quantizes, by module name."""
    plan = plan_layers(model, partial(OTQConfig(bits=4).layer_spec, skip=()), warn=False)
    return {layer.name: layer.module.weight.detach().float().clone() for layer in plan}


def _setting(qweight: Any) -> str:
    """One layer's setting as the allocator labels it (:func:`~diffusers_otq.options.setting_label`)."""
    return setting_label(
        qweight.bits, qweight.granularity, qweight.group_size, qweight.vector_dim, qweight.codebook.dtype
    )


def _plan_summary(model: nn.Module) -> dict[str, Any]:
    """The allocator's record of a mixed variant: ``budget``, ``reached`` bits/weight, ``sensitivity`` and the
    number of layers per setting (``layers``), from ``model.config.quantization_config.provenance``."""
    return dict(_provenance(model).get("bits_per_weight") or {})


def _provenance(model: nn.Module) -> dict[str, Any]:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return {}
    provenance = config.get("provenance") if isinstance(config, dict) else config.provenance
    return dict(provenance or {})


def _deploy_ours(
    model: nn.Module,
    variant: Variant,
    statistics: CalibrationStatistics | None,
    calibration: CalibrationConfig | None,
    teacher: TeacherCalls | None = None,
    candidates: CandidateTable | None = None,
) -> dict:
    from ..api import quantize_model as quantize_data_free
    from ..calibration import quantize_model
    from ..layers import OTQLayerMixin

    if variant.calibrated and statistics is None:
        raise ValueError(
            f"{variant.method!r} fits on calibration statistics; pass statistics=diffusers_otq.calibrate(pipe, "
            "OTQConfig(bits=4), CalibrationConfig(...)) (the evaluation runner collects them once per model)."
        )
    originals = _layer_weights(model)
    float_numel = _float_numel(model) - sum(w.numel() for w in originals.values())
    config = otq_config(variant)
    start = time.perf_counter()
    if variant.calibrated or variant.mixed:
        base = replace(calibration or CalibrationConfig(), progress=False)
        # only the refined methods refine; a data-free budget allocates without a teacher
        fit = CALIBRATED[variant.method].calibration(base) if variant.calibrated else replace(base, refine_steps=0)
        statistics = statistics if variant.calibrated else None  # a data-free budget allocates without them
        quantize_model(model, config, statistics=statistics, calibration=fit, teacher=teacher, candidates=candidates,
                       progress=False, compute_metrics=False)  # fmt: skip
    else:
        quantize_data_free(model, config, progress=False, compute_metrics=False)
    seconds = time.perf_counter() - start
    layers, stored_bits, quantized_numel = [], 0.0, 0
    for name, module in model.named_modules():
        if isinstance(module, OTQLayerMixin):
            # the effective weight and every stored byte (low-rank factors and rotation signs included)
            layers.append(_layer_row(name, originals[name], module.dequantize_weight(torch.float32)))
            if variant.mixed:
                layers[-1]["setting"] = _setting(module.quantized_weight())
            stored_bits += _stored_bits(module, variant.method)
            quantized_numel += module.weight_shape.numel()
    summary = _summary(layers, stored_bits, quantized_numel, float_numel, seconds)
    if variant.calibrated:
        summary["calibrate_s"] = float(statistics.info.get("seconds", math.nan))
    if variant.mixed:
        summary["plan"] = _plan_summary(model)
    refinement = _provenance(model).get("refinement")
    if refinement:  # the refinement is part of quantize_s; its own seconds and teacher losses are recorded too
        summary["refine_s"] = refinement["seconds"]
        summary["refine_loss"] = [refinement["loss_before"], refinement["loss_after"]]
        summary["refine_steps"] = refinement["steps"]
    return summary


def _stored_bits(module: nn.Module, method: str) -> int:
    """Every stored bit of an OTQ layer; for a calibrated peer, its codes plus its own format's metadata per row
    (or group) (:data:`NATIVE_METADATA_BITS`), as that format would store it."""
    if method not in NATIVE_METADATA_BITS:
        return module.nbytes * 8
    quantized = module.quantized_weight()
    rows, n = quantized.rows
    groups = rows * (n // quantized.group_size if quantized.group_size else 1)
    return quantized.numel * quantized.bits + groups * NATIVE_METADATA_BITS[method]


def _deploy_gguf(model: nn.Module, variant: Variant, statistics: CalibrationStatistics | None) -> dict:
    """Every Linear/Conv2d weight of the deploy scope through llama.cpp's quantizer (:mod:`.gguf`) with the layer's
    input second moments as importance matrix, replaced by its decoded values; every stored byte counted."""
    if statistics is None:
        raise ValueError(f"{variant.method!r} needs calibration statistics for its importance matrix.")
    originals = _layer_weights(model)
    float_numel = _float_numel(model) - sum(w.numel() for w in originals.values())
    start = time.perf_counter()
    layers, stored_bits, quantized_numel = [], 0, 0
    for name, original in originals.items():
        module = model.get_submodule(name)
        rows = original.reshape(original.shape[0], -1)
        stats = statistics.get(name)
        # (G, n): the importance of each input group's rows (a grouped conv has several); no statistics: uniform
        importance = torch.ones(1, rows.shape[1]) if stats is None else stats.second_moments()
        per_group = rows.shape[0] // importance.shape[0]
        decoded, types = [], set()
        for g, group_importance in enumerate(importance):
            part = rows[g * per_group : (g + 1) * per_group]
            values, nbytes, stored = gguf_quantize(part, variant.method, group_importance)
            decoded.append(values)
            stored_bits += nbytes * 8
            types.add(stored)
        weight = torch.cat(decoded).reshape(original.shape)
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype))
        layers.append({**_layer_row(name, original, weight), "setting": "+".join(sorted(types))})
        quantized_numel += original.numel()
    summary = _summary(layers, stored_bits, quantized_numel, float_numel, time.perf_counter() - start)
    summary["calibrate_s"] = float(statistics.info.get("seconds", math.nan))
    return summary


def _float_numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _deploy_peer(model: nn.Module, variant: Variant) -> dict:
    peer = peer_format(variant.method)
    plan = plan_layers(model, partial(OTQConfig(bits=4).layer_spec, skip=()), warn=False)
    float_numel = _float_numel(model)
    layers, stored_bits, quantized_numel, seconds = [], 0.0, 0, 0.0
    for layer in plan:
        weight = layer.module.weight
        original = weight.detach().float()
        start = time.perf_counter()
        try:
            result = peer.quantize(original.reshape(original.shape[0], -1))
        except PeerNotApplicable as err:
            skipped = {"name": layer.name, "numel": original.numel(), "rel_mse": 0.0, "w2": 0.0, "skipped": str(err)}
            layers.append(skipped)
            continue
        seconds += time.perf_counter() - start
        dequantized = result.dequantized.reshape(original.shape)
        layers.append(_layer_row(layer.name, original, dequantized))
        with torch.no_grad():
            weight.copy_(dequantized.to(weight.dtype))
        stored_bits += result.stored_bits
        quantized_numel += original.numel()
    skipped_numel = sum(row["numel"] for row in layers if row.get("skipped"))
    summary = _summary(
        layers,
        stored_bits + skipped_numel * _FLOAT_BITS,
        quantized_numel + skipped_numel,
        float_numel - quantized_numel - skipped_numel,
        seconds,
    )
    summary["format"] = peer.description
    summary["native_coverage"] = peer.native_coverage
    return summary


def _paper_scope(model: nn.Module, variant: Variant) -> dict:
    layers, stored_bits, quantized_numel, float_numel, seconds = [], 0.0, 0, 0, 0.0
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        original = tensor.detach().float()
        granularity = variant.granularity if tensor.ndim >= 2 else "tensor"
        group_size = variant.group_size if granularity == "group" else None
        if granularity == "group" and math.prod(tensor.shape[1:]) % variant.group_size != 0:
            granularity, group_size = "channel", None
        start = time.perf_counter()
        qtensor = quantize_tensor(
            original, variant.bits, variant.method, granularity, group_size, codebook_dtype=torch.float32, name=name
        )
        dequantized = qtensor.dequantize(torch.float32)
        seconds += time.perf_counter() - start
        layers.append(_layer_row(name, original, dequantized))
        with torch.no_grad():
            tensor.copy_(dequantized.to(tensor.dtype))
        stored_bits += qtensor.nbytes * 8
        quantized_numel += original.numel()
    return _summary(layers, stored_bits, quantized_numel, float_numel, seconds)


def quantize_variant(
    model: nn.Module,
    variant: Variant,
    *,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    teacher: TeacherCalls | None = None,
    candidates: CandidateTable | None = None,
) -> dict:
    """Turn the float ``model`` into ``variant`` in place; returns the ``weights`` metrics of the variant.

    Args:
        model: the float denoiser (changed in place).
        variant: the grid point.
        statistics: the model's calibration statistics (every Linear/Conv2d, e.g. from
            ``diffusers_otq.calibrate(pipe, OTQConfig(bits=4), ...)``); required by calibrated variants, ignored
            by the others (a data-free mixed variant allocates without them).
        calibration: fit settings (damping, refit rounds, sensitivity) a calibrated variant's switches are
            applied to (:meth:`CalibratedFit.calibration`); defaults when None.
        teacher: the full-precision model's recorded calls and outputs, for refined variants (``ot-vp+ref``).
        candidates: a mixed variant's candidate settings measured once for several budgets
            (:func:`~diffusers_otq.calibration.measure_candidates` with :func:`otq_config` and the same statistics).

    Returns:
        ``bits_per_weight``, ``model_bytes``, ``quantize_s`` (the quantize call, bits allocation included),
        ``quantized_layers``, ``skipped_layers``, ``rel_mse_mean`` (numel-weighted), ``w2_mean`` (mean over
        layers) and ``layers`` (per tensor: name, numel, rel_mse, w2; peers add ``skipped`` with the reason for
        weights their format cannot store; mixed variants add each layer's ``setting``). Calibrated variants add
        ``calibrate_s`` (``statistics.info["seconds"]``, the one-off statistics collection); mixed variants add
        ``plan`` (``budget``, ``reached``, ``sensitivity`` and ``layers``: the number of layers per setting).

    Raises:
        ValueError: a calibrated variant without ``statistics``.
    """
    family = family_of(variant.method)
    if family == "peer":
        return _deploy_peer(model, variant)
    if variant.method in GGUF_FORMATS:
        return _deploy_gguf(model, variant, statistics)
    if variant.scope == "paper":
        return _paper_scope(model, variant)
    return _deploy_ours(model, variant, statistics, calibration, teacher, candidates)
