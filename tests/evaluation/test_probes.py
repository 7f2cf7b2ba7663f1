"""The paper's probes on real diffusers denoisers: velocity at t=0, bottleneck features, PCA statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_otq import quantize_model
from diffusers_otq.evaluation.probes import (
    PAPER_T0_TIMESTEP,
    bottleneck_features,
    bottleneck_module,
    feature_agreement,
    pca_statistics,
    velocity_outputs,
)
from diffusers_otq.testing.tiny_models import tiny_dit, tiny_unet


def _images(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_velocity_outputs_is_the_model_at_the_noise_end():
    model = tiny_unet(num_class_embeds=11)
    images = _images()
    out = velocity_outputs(model, images, null_label=10, batch_size=5)  # batching must not change the result
    with torch.no_grad():
        direct = model(images, torch.full((12,), PAPER_T0_TIMESTEP), class_labels=torch.full((12,), 10)).sample
    torch.testing.assert_close(out, direct)


def test_bottleneck_of_unet_is_mid_block_output():
    model = tiny_unet(num_class_embeds=11)
    seen = []
    model.mid_block.register_forward_hook(lambda m, i, o: seen.append(o.detach().reshape(len(o), -1)))
    with torch.no_grad():
        model(_images(), torch.full((12,), PAPER_T0_TIMESTEP), class_labels=torch.full((12,), 10))
    features = bottleneck_features(model, _images(), null_label=10, batch_size=7)
    torch.testing.assert_close(features, seen[0])
    assert bottleneck_module(model)[0] == "mid_block"


def test_bottleneck_of_dit_is_middle_block_and_unconditional_unet_works():
    dit = tiny_dit(num_layers=3, num_classes=11)
    assert bottleneck_module(dit)[0] == "transformer_blocks.1"
    assert bottleneck_features(dit, _images(4), null_label=10).shape == (4, 16 * 32)
    assert bottleneck_features(tiny_unet(), _images(4), null_label=None).shape[0] == 4
    with pytest.raises(ValueError, match="no mid_block"):
        bottleneck_module(torch.nn.Linear(2, 2))


def test_quantization_moves_features_and_agreement_measures_it():
    model = tiny_unet(num_class_embeds=11)
    reference = bottleneck_features(model, _images(32), 10)
    same = feature_agreement(reference, reference)
    assert same["latent_cosine"] == pytest.approx(1.0) and same["latent_rel_l2"] == 0.0
    errors = []
    for bits in (2, 4, 8):
        quantized = copy.deepcopy(model)
        quantize_model(quantized, bits=bits, progress=False)
        errors.append(feature_agreement(reference, bottleneck_features(quantized, _images(32), 10))["latent_rel_l2"])
    assert errors[0] > errors[1] > errors[2] > 0


def test_pca_statistics_recovers_known_variances():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.0, 1.0, 1e-3])
    features = torch.randn(4000, 4, generator=generator, dtype=torch.float64) * scales
    stats = pca_statistics(features, components=4)
    torch.testing.assert_close(
        torch.tensor(stats["pca_variances"], dtype=torch.float64), scales.double() ** 2, rtol=0.08, atol=1e-6
    )
    assert stats["pca_collapsed"] == 1  # 1e-6 < 1e-4
    assert stats["pca_mean_var"] == pytest.approx(sum(stats["pca_variances"]) / 4)
    assert len(pca_statistics(features[:3], components=20)["pca_variances"]) == 3  # capped at min(N, D)
