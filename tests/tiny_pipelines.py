"""Tiny, offline diffusers pipelines for tests.

The builders assemble pipelines from small configs with seeded random weights. They download
nothing: the text encoders are built from configs and the tokenizers from in-memory
vocabularies (transformers 5.x). ``save_tiny`` writes a pipeline with ``save_pretrained`` so
that a worker can load it with ``Pipeline.from_pretrained(local_dir)``.

Every ``torch.nn.Module`` component is put in eval mode: modules built from a config start in
train mode, and T5's dropout would otherwise make two same-seed calls differ.

Call the pipelines with the keyword arguments in ``FLUX_CALL_KWARGS`` / ``SD_CALL_KWARGS``
(plus ``generator`` and ``num_inference_steps``). Set ``HF_HUB_OFFLINE=1`` in the test
environment so that an accidental hub id fails fast instead of retrying for ~20 s.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SEED = 0

# CLIP tokenizer layout: the two special tokens first, so that bos=0 and eos=pad=1.
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BOS_ID, CLIP_EOS_ID = 0, 1
CLIP_MAX_LENGTH = 77  # = CLIPTextConfig.max_position_embeddings (default)
T5_MAX_LENGTH = 512  # FluxPipeline refuses max_sequence_length > 512

TEXT_VOCAB_SIZE = 1000  # embedding rows of both text encoders; both tokenizers use fewer ids
TEXT_HIDDEN = 32

# Keyword arguments for a fast, valid call (add prompt, generator, num_inference_steps).
# Flux: vae_scale_factor is 1, so height and width must be multiples of 2; the latents come
# back packed as (B, (H/2)*(W/2), 4). max_sequence_length defaults to 512 T5 tokens: keep it
# small. guidance_scale feeds the transformer's guidance embedding (no CFG batch).
FLUX_CALL_KWARGS: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "guidance_scale": 3.5,
    "max_sequence_length": 32,
}
# SD: height and width must be multiples of 8 (check_inputs); vae_scale_factor is 2, so the
# latents come back as (B, 4, H/2, W/2). The default size is unet.sample_size * 2 = 32.
# guidance_scale > 1 turns on classifier-free guidance (UNet batch of 2).
SD_CALL_KWARGS: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "guidance_scale": 5.0,
}


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with every byte as a token (and as an end-of-word token); no merges."""
    alphabet = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for the bytes
    vocab = {CLIP_BOS: CLIP_BOS_ID, CLIP_EOS: CLIP_EOS_ID}
    for piece in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab[piece] = len(vocab)
    assert len(vocab) <= TEXT_VOCAB_SIZE
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram over single characters, with "▁"-prefixed word-initial variants."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -1.0) for c in chars]
    vocab += [(c, -1.5) for c in chars]
    assert len(vocab) <= TEXT_VOCAB_SIZE
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_encoder(hidden_size: int = TEXT_HIDDEN) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=CLIP_BOS_ID,
        # eos must match the tokenizer: with eos_token_id == 2 CLIP pools at argmax(input_ids).
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=TEXT_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
    )
    torch.manual_seed(SEED)
    return _eval(CLIPTextModel(config))


def _t5_text_encoder() -> T5EncoderModel:
    config = T5Config(
        vocab_size=TEXT_VOCAB_SIZE,
        d_model=TEXT_HIDDEN,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=5,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(SEED)
    return _eval(T5EncoderModel(config))


def build_tiny_flux() -> FluxPipeline:
    """A ~0.2 M parameter FluxPipeline (guidance-distilled transformer, 1 + 1 blocks)."""
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel packed as 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
    )
    text_encoder = _clip_text_encoder()
    text_encoder_2 = _t5_text_encoder()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_eval(vae),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(),
        transformer=_eval(transformer),
    )


def build_tiny_sd() -> StableDiffusionPipeline:
    """A ~0.1 M parameter StableDiffusionPipeline with a DDIM scheduler, no safety checker."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=2,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_eval(vae),
        text_encoder=_clip_text_encoder(),
        tokenizer=_clip_tokenizer(),
        unet=_eval(unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny(pipe: DiffusionPipeline, directory: str | Path) -> Path:
    """Write ``pipe`` with ``save_pretrained`` (safetensors) and return the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
