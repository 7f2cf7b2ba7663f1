"""``FlowMatchPipeline``: class-conditional (or unconditional) flow-matching image generation, DDPMPipeline-style.

Velocity convention, the one of ``FlowMatchEulerDiscreteScheduler``/``FlowMatchHeunDiscreteScheduler``: with
data ``x0``, noise ``eps`` and ``sigma`` in [0, 1],

    x_sigma = sigma * eps + (1 - sigma) * x0,      timestep = 1000 * sigma,      v = d x_sigma / d sigma = eps - x0,

and the denoiser ``transformer(x_sigma, timestep, class_labels)`` predicts ``v``. Sampling starts from pure
noise (sigma = 1) and the scheduler integrates ``x <- x + (sigma_next - sigma) * v`` down to sigma = 0. Images
live in [-1, 1] and are mapped to [0, 1] at the end. The test suite checks the convention with an exact
velocity field, for which Euler recovers ``x0`` exactly.

Class labels ``0..num_classes-1``; index ``num_classes`` is the null label the reference models were trained
with (label dropout) and that classifier-free guidance uses: ``v = v_null + s * (v_cond - v_null)``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
    PipelineQuantizationConfig,
)
from diffusers.utils.torch_utils import randn_tensor

from .config import OTQConfig
from .reference import resolve_reference


__all__ = ["FlowMatchPipeline"]

OUTPUT_TYPES = ("pil", "np", "pt")


class FlowMatchPipeline(DiffusionPipeline):
    r"""Generate images with a velocity-predicting flow-matching denoiser.

    Args:
        transformer: the denoiser, any ``ModelMixin`` whose forward takes ``(sample, timestep[, class_labels])``
            and returns ``.sample``: ``UNet2DModel`` (with ``num_class_embeds`` for class conditioning) or
            ``DiTTransformer2DModel`` (``num_embeds_ada_norm`` classes).
        scheduler: ``FlowMatchEulerDiscreteScheduler`` or ``FlowMatchHeunDiscreteScheduler``.

    Example:
        >>> import diffusers_otq
        >>> from diffusers_otq import FlowMatchPipeline, OTQConfig
        >>> pipe = FlowMatchPipeline.from_pretrained("otq/fashion-mnist-unet", quantization_config=OTQConfig(bits=3))  # doctest: +SKIP
        >>> images = pipe(batch_size=10, class_labels=list(range(10)), guidance_scale=2.0).images  # doctest: +SKIP
    """

    model_cpu_offload_seq = "transformer"

    def __init__(
        self,
        transformer: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> FlowMatchPipeline:
        """Load a pipeline folder, a Hub id, or a bundled reference pipeline by short name (``"otq/..."``).

        ``quantization_config`` may be an :class:`OTQConfig` (applied to the transformer) or a diffusers
        ``PipelineQuantizationConfig``. A folder saved from a quantized pipeline reloads without it.

        Raises:
            ValueError: unknown bundled name (lists the valid ones); a local path that is not a pipeline folder.
        """
        path = resolve_reference(pretrained_model_name_or_path)
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
            hint = (
                " It looks like a single model folder (config.json); load it with its model class, e.g. "
                "UNet2DModel.from_pretrained, and build FlowMatchPipeline(transformer=..., scheduler=...)."
                if os.path.isfile(os.path.join(path, "config.json"))
                else ""
            )
            raise ValueError(f"{os.fspath(path)!r} is not a diffusers pipeline folder (no model_index.json).{hint}")
        config = kwargs.get("quantization_config")
        if isinstance(config, OTQConfig):
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"transformer": config})
        return super().from_pretrained(path, **kwargs)

    # ----------------------------------------------------------------------------------------- model facts

    @property
    def num_classes(self) -> int:
        """Number of real classes the denoiser is conditioned on (0 for an unconditional model)."""
        config = self.transformer.config
        if config.get("num_class_embeds"):
            return int(config["num_class_embeds"]) - 1  # the last row is the null label
        if config.get("num_embeds_ada_norm") and "class_labels" in self._forward_parameters():
            return int(config["num_embeds_ada_norm"])
        return 0

    def _forward_parameters(self) -> set[str]:
        return set(inspect.signature(self.transformer.forward).parameters)

    def _sample_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        config = self.transformer.config
        size = config.get("sample_size")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return batch_size, int(config["in_channels"]), int(height), int(width)

    def _velocity(self, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        kwargs = {} if labels is None else {"class_labels": labels}
        return self.transformer(sample, timestep, return_dict=True, **kwargs).sample

    # ---------------------------------------------------------------------------------------------- sampling

    def _check_inputs(
        self, batch_size: int, class_labels: Any, num_inference_steps: int, guidance_scale: float, output_type: str
    ) -> torch.Tensor | None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int.")
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an int >= 1 (e.g. 30).")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; expected one of {list(OUTPUT_TYPES)}.")
        if not isinstance(guidance_scale, int | float) or not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1.0 disables guidance).")
        if class_labels is None:
            return None
        num_classes = self.num_classes
        if num_classes == 0:
            raise ValueError(
                f"class_labels were given, but {type(self.transformer).__name__} is not class-conditional; "
                "drop class_labels."
            )
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}.")
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} class_labels for batch_size={batch_size}; give 1 or {batch_size}.")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"class_labels {bad.unique().tolist()} are out of range; this model has {num_classes} classes "
                f"(0..{num_classes - 1})."
            )
        return labels.to(torch.int64)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 30,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Sample images.

        Args:
            batch_size: number of images.
            class_labels: one label for all images or one per image (``0..num_classes-1``); None samples a
                class-conditional model with the null label (unconditional).
            guidance_scale: classifier-free guidance ``s`` (1.0: plain conditional sampling, no extra pass).
            num_inference_steps: solver steps (Heun makes two model calls per step but the last).
            generator: torch generator(s) for the initial noise; the same generator gives the same images.
            latents: optional initial noise ``(batch_size, C, H, W)`` instead of drawing it.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, C)`` float in [0, 1]) or ``"pt"`` (``(B, C, H, W)``).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).

        Returns:
            ``ImagePipelineOutput(images=...)``.
        """
        labels = self._check_inputs(batch_size, class_labels, num_inference_steps, guidance_scale, output_type)
        device = self._execution_device
        dtype = self.transformer.dtype
        shape = self._sample_shape(batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}.")
        latents = latents.to(device=device, dtype=dtype)

        conditional = self.num_classes > 0
        if conditional and labels is None:
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.int64)  # the null label
        guided = labels is not None and guidance_scale != 1.0 and bool((labels != self.num_classes).any())
        if labels is not None:
            labels = labels.to(device)
            model_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            # 1. predict the velocity (conditional and null in one batch when guiding)
            model_input = torch.cat([latents, latents]) if guided else latents
            timestep = t.expand(model_input.shape[0]).to(dtype)
            velocity = self._velocity(model_input, timestep, model_labels if labels is not None else None)
            if guided:
                v_cond, v_null = velocity.chunk(2)
                velocity = v_null + guidance_scale * (v_cond - v_null)
            # 2. step from sigma to the next sigma
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result: Any = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)

    # ------------------------------------------------------------------------------------------------- hub

    def _upload_folder(self, working_dir: str | os.PathLike, repo_id: str, **kwargs: Any) -> Any:
        """Write the OTQ model card (when a component is quantized) before uploading, as models do."""
        from .hub import write_model_card
        from .layers import OTQLayerMixin

        if not kwargs.get("subfolder") and any(isinstance(m, OTQLayerMixin) for m in self.transformer.modules()):
            write_model_card(self, working_dir, repo_id)
        return super()._upload_folder(working_dir, repo_id, **kwargs)
