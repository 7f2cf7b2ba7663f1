"""Tiny real diffusers models and pipelines built from configs only (nothing is downloaded).

The SD3 and Flux pipelines follow diffusers' own pipeline tests, with the tokenizers built locally: a CLIP BPE
tokenizer from a 60-entry vocabulary and a word-level T5 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)


def tiny_unet(seed: int = 0, num_class_embeds: int | None = None, attention: bool = True) -> UNet2DModel:
    """A 2-level UNet2DModel (Conv2d and Linear layers) for 8x8 single-channel images.

    ``num_class_embeds=11`` makes it class-conditional (10 classes plus the null label).
    """
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def tiny_dit(seed: int = 0, num_layers: int = 1, num_classes: int = 10) -> DiTTransformer2DModel:
    """A DiTTransformer2DModel (AdaLN-Zero, ``num_classes`` label rows) for 8x8 single-channel images."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=16,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=num_classes,
    ).eval()


def unet_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 1, 8, 8, generator=generator), "timestep": torch.tensor([10, 500][:batch])}


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 2) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
    ).eval()


def sd3_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 64, generator=generator),
        "timestep": torch.tensor([100, 700][:batch]),
    }


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()


def flux_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "img_ids": torch.randn(16, 3, generator=generator),
        "txt_ids": torch.randn(6, 3, generator=generator),
        "timestep": torch.tensor([0.3, 0.8][:batch]),
    }


def _clip_tokenizer(folder: Path) -> CLIPTokenizer:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", "!", *letters, *(f"{c}</w>" for c in letters)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "shirt", "shoe"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2))


def tiny_t5_encoder(seed: int = 0) -> T5EncoderModel:
    """The tiny T5 text encoder of the Flux and SD3 test pipelines (2 layers, 32 wide, a 32-token vocabulary)."""
    torch.manual_seed(seed)
    return _t5().eval()


def tiny_clip_text_model(seed: int = 0) -> CLIPTextModel:
    """The tiny CLIP text encoder of the test pipelines (2 layers, 32 wide, a 1000-token vocabulary)."""
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config()).eval()


def t5_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    """Token ids for :func:`tiny_t5_encoder`."""
    return {"input_ids": torch.randint(0, 32, (batch, 7), generator=torch.Generator().manual_seed(1))}


def clip_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    """Token ids for :func:`tiny_clip_text_model`."""
    return {"input_ids": torch.randint(0, 1000, (batch, 7), generator=torch.Generator().manual_seed(1))}


def _vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_pipeline(tmp: Path) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(num_layers=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4),
        text_encoder=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=_clip_tokenizer(tmp / "tok1"),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer_2=_clip_tokenizer(tmp / "tok2"),
        text_encoder_3=_t5(),
        tokenizer_3=_t5_tokenizer(),
    )


def tiny_flux_pipeline(tmp: Path) -> FluxPipeline:
    torch.manual_seed(0)
    return FluxPipeline(
        transformer=tiny_flux_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(1),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_clip_tokenizer(tmp / "tok1"),
        text_encoder_2=_t5(),
        tokenizer_2=_t5_tokenizer(),
    )


PIPELINE_CALL = {
    "sd3": {"prompt": "a photo of a cat", "num_inference_steps": 2, "height": 16, "width": 16, "output_type": "pt"},
    "flux": {
        "prompt": "a photo of a dog",
        "num_inference_steps": 2,
        "height": 8,
        "width": 8,
        "max_sequence_length": 48,
        "output_type": "pt",
    },
}
