"""Tiny, offline diffusers pipelines for tests.

The builders assemble pipelines from small configs with seeded random weights. They download
nothing: the text encoders are built from configs and the tokenizers from in-memory
vocabularies (transformers 5.x). ``save_tiny`` writes a pipeline with ``save_pretrained`` so
that a worker can load it with ``Pipeline.from_pretrained(local_dir)``.

Every ``torch.nn.Module`` component is put in eval mode: modules built from a config start in
train mode, and T5's dropout would otherwise make two same-seed calls differ.

Call the pipelines with the keyword arguments in the matching ``*_CALL_KWARGS`` (``FLUX_``,
``SD_``, ``SDXL_``, ``SD3_``, ``WAN_``, ``HUNYUAN_``, ``COGVIDEOX_``), plus ``prompt``,
``generator`` and ``num_inference_steps``. Set ``HF_HUB_OFFLINE=1`` in the test environment so
that an accidental hub id fails fast instead of retrying for ~20 s.

The tokenizers are character-level: a prompt uses about one token per character, so CLIP keeps
~75 characters and T5 / Llama keep ``max_sequence_length - 1``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
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


def _clip_text_config(hidden_size: int = TEXT_HIDDEN, num_hidden_layers: int = 5) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=CLIP_BOS_ID,
        # eos must match the tokenizer: with eos_token_id == 2 CLIP pools at argmax(input_ids).
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=num_hidden_layers,
        vocab_size=TEXT_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
    )


def _clip_text_encoder(hidden_size: int = TEXT_HIDDEN, num_hidden_layers: int = 5) -> CLIPTextModel:
    config = _clip_text_config(hidden_size, num_hidden_layers)
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


# --- SD3, Wan, HunyuanVideo, CogVideoX -------------------------------------------------------

# SD3: the VAE has two blocks, so vae_scale_factor is 2 and the latents come back unpacked as
# (B, 4, H/2, W/2). Height and width must be multiples of 2 and at most 32 (pos_embed_max_size
# 16); the default is 16. The text sequence is 77 CLIP tokens + max_sequence_length T5 tokens.
# guidance_scale > 1 turns on CFG (transformer batch of 2).
SD3_CALL_KWARGS: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "guidance_scale": 5.0,
    "max_sequence_length": 32,
}
# Wan: height and width must be multiples of 16 (vae_scale_factor_spatial 8 * patch 2);
# num_frames - 1 must be a multiple of 4 (otherwise rounded, with a warning). The latents come
# back as (B, 16, (F - 1) / 4 + 1, H/8, W/8), float32 even for a bfloat16 pipeline.
# guidance_scale > 1 turns on CFG (two transformer calls per step, empty negative prompt).
WAN_CALL_KWARGS: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "num_frames": 9,
    "guidance_scale": 5.0,
    "max_sequence_length": 32,
}
# HunyuanVideo: height and width must be multiples of 16; latents (B, 4, (F - 1) / 4 + 1, H/8,
# W/8). guidance_scale feeds the guidance embedding (no CFG batch); real CFG only runs with
# true_cfg_scale > 1 *and* a negative prompt. The default prompt_template is the Llama-3 chat
# template with crop_start=95: with a character-level tokenizer the prompt would be truncated
# away without an error. Use the bare template.
HUNYUAN_CALL_KWARGS: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "num_frames": 9,
    "guidance_scale": 6.0,
    "max_sequence_length": 32,
    "prompt_template": {"template": "{}", "crop_start": 0},
}
# CogVideoX: note the frame-first layout of the latents, (B, (F - 1) / 4 + 1, 4, H/8, W/8).
# max_sequence_length must equal the transformer's max_text_seq_length: the positional
# embedding has exactly that many text rows. Height and width must be multiples of 16
# (vae_scale_factor_spatial 8 * patch 2). Use num_frames = 8k + 1 (1, 9, 17, ...): an odd
# number of latent frames decodes back to num_frames, an even one does not (5 -> 8 frames).
# guidance_scale > 1 turns on CFG (batch of 2).
COGVIDEOX_MAX_TEXT_SEQ_LENGTH = 32
COGVIDEOX_CALL_KWARGS: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "num_frames": 9,
    "guidance_scale": 6.0,
    "max_sequence_length": COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
}

# Llama tokenizer layout: unk (also the pad token), bos, eos, then the 256 byte-fallback tokens.
LLAMA_UNK, LLAMA_BOS, LLAMA_EOS = "<unk>", "<s>", "</s>"
LLAMA_PAD_ID, LLAMA_BOS_ID, LLAMA_EOS_ID = 0, 1, 2
HUNYUAN_TEXT_HIDDEN = 16  # Llama hidden size = transformer text_embed_dim
HUNYUAN_POOLED_HIDDEN = 8  # CLIP hidden size = transformer pooled_projection_dim


def _clip_text_encoder_with_projection(hidden_size: int, seed: int) -> CLIPTextModelWithProjection:
    """CLIP with a signed-selection ``text_projection`` (one +-1 per row, zeros elsewhere).

    A random projection would make reloaded and in-memory pipelines differ by ~1 ulp:
    transformers 5 loads the weights as views into the safetensors buffer, not 64-byte
    aligned, and the pooled (batch 1) matmul then rounds differently. With one nonzero per
    row the product is exact under any summation order.
    """
    config = _clip_text_config(hidden_size)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config)
    rows = torch.arange(config.projection_dim)
    signs = 1.0 - 2.0 * ((rows // hidden_size) % 2)
    weight = torch.zeros(config.projection_dim, hidden_size)
    weight[rows, rows % hidden_size] = signs
    with torch.no_grad():
        model.text_projection.weight.copy_(weight)
    return _eval(model)


def _umt5_text_encoder() -> UMT5EncoderModel:
    """UMT5 with the same sizes as ``_t5_text_encoder`` (WanPipeline expects UMT5)."""
    config = UMT5Config(
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
    return _eval(UMT5EncoderModel(config))


def _llama_tokenizer() -> LlamaTokenizer:
    """BPE with no merges: printable characters as tokens, anything else as byte fallback."""
    vocab = {LLAMA_UNK: LLAMA_PAD_ID, LLAMA_BOS: LLAMA_BOS_ID, LLAMA_EOS: LLAMA_EOS_ID}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in ["▁"] + [c for c in string.printable if not c.isspace()]:
        vocab[ch] = len(vocab)
    assert len(vocab) <= TEXT_VOCAB_SIZE
    return LlamaTokenizer(
        vocab=vocab,
        merges=[],
        unk_token=LLAMA_UNK,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
        pad_token=LLAMA_UNK,
        model_max_length=T5_MAX_LENGTH,
    )


def _llama_text_encoder() -> LlamaModel:
    config = LlamaConfig(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=HUNYUAN_TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        # HunyuanVideo takes hidden_states[-3]: keep at least 2 layers.
        num_hidden_layers=2,
        max_position_embeddings=T5_MAX_LENGTH,
        pad_token_id=LLAMA_PAD_ID,
        bos_token_id=LLAMA_BOS_ID,
        eos_token_id=LLAMA_EOS_ID,
    )
    torch.manual_seed(SEED)
    return _eval(LlamaModel(config))


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline: 1-layer MMDiT, two CLIPs with projection and a T5."""
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # default height/width = 8 * vae_scale_factor = 16
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,  # = num_attention_heads * attention_head_dim
        joint_attention_dim=TEXT_HIDDEN,  # T5 d_model = both CLIP hidden sizes concatenated
        pooled_projection_dim=64,  # both CLIP projections concatenated (2 * 32)
        out_channels=4,
        pos_embed_max_size=16,  # latent sides up to 16 (images up to 32x32)
    )
    # Each CLIP has hidden size TEXT_HIDDEN / 2: SD3 concatenates them and pads (or, if wider,
    # crops) the result to the T5 width.
    text_encoder = _clip_text_encoder_with_projection(TEXT_HIDDEN // 2, seed=SEED)
    text_encoder_2 = _clip_text_encoder_with_projection(TEXT_HIDDEN // 2, seed=SEED + 1)
    text_encoder_3 = _t5_text_encoder()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_eval(vae),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(),
        transformer=_eval(transformer),
    )


def build_tiny_wan() -> WanPipeline:
    """A WanPipeline (Wan 2.1 layout): 2-layer transformer, UMT5, UniPC flow scheduler."""
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_HIDDEN,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(SEED)
    # z_dim stays 16: latents_mean / latents_std default to 16 entries.
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=3.0,
    )
    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5_text_encoder(),
        transformer=_eval(transformer),
        vae=_eval(vae),
        scheduler=scheduler,
    )


def build_tiny_hunyuan_video() -> HunyuanVideoPipeline:
    """A HunyuanVideoPipeline: 1 + 1 block guidance-distilled transformer, Llama + CLIP."""
    torch.manual_seed(SEED)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=HUNYUAN_TEXT_HIDDEN,
        pooled_projection_dim=HUNYUAN_POOLED_HIDDEN,
        rope_axes_dim=(2, 4, 4),  # sums to attention_head_dim
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    return HunyuanVideoPipeline(
        text_encoder=_llama_text_encoder(),
        tokenizer=_llama_tokenizer(),
        transformer=_eval(transformer),
        vae=_eval(vae),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text_encoder(HUNYUAN_POOLED_HIDDEN, num_hidden_layers=2),
        tokenizer_2=_clip_tokenizer(),
    )


def build_tiny_cogvideox() -> CogVideoXPipeline:
    """A CogVideoXPipeline (CogVideoX-2b layout): 1-layer transformer, T5, v-prediction DDIM."""
    torch.manual_seed(SEED)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,  # inner dim 16: the 3D sincos embedding needs a multiple of 16
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=TEXT_HIDDEN,
        num_layers=1,
        sample_width=2,  # latent size of the default call: 16x16 pixels, 9 frames
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_MAX_TEXT_SEQ_LENGTH,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=True,
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_text_encoder(),
        vae=_eval(vae),
        transformer=_eval(transformer),
        scheduler=scheduler,
    )


# --- SDXL -------------------------------------------------------------------------------------

# SDXL: the same 2-block VAE as SD (vae_scale_factor 2), so height and width must be multiples of
# 8 and the latents come back as (B, 4, H/2, W/2); the default size is unet.sample_size * 2 = 32.
# guidance_scale > 1 turns on CFG (UNet batch of 2); with force_zeros_for_empty_prompt (the
# default, True) and no negative prompt the negative embeddings are zeros.
SDXL_CALL_KWARGS: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "guidance_scale": 5.0,
}
SDXL_ADDITION_TIME_EMBED_DIM = 8


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline: tiny "text_time" UNet, CLIP + CLIP with projection, DDIM."""
    # SDXL takes the penultimate hidden states of both CLIPs, concatenated (2 * TEXT_HIDDEN), and
    # the pooled projection of the second one (projection_dim 32) plus 6 micro-conditioning
    # values (original size, crop top-left, target size), each embedded to
    # SDXL_ADDITION_TIME_EMBED_DIM.
    text_encoder = _clip_text_encoder()
    text_encoder_2 = _clip_text_encoder_with_projection(TEXT_HIDDEN, seed=SEED + 1)
    pooled_dim = text_encoder_2.config.projection_dim
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        # Real SDXL uses linear proj_in / proj_out; keep the 1x1 convs: a reloaded Linear
        # (unaligned safetensors view) rounds differently from the in-memory one by ~1 ulp.
        use_linear_projection=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_ADDITION_TIME_EMBED_DIM + pooled_dim,
        cross_attention_dim=2 * TEXT_HIDDEN,
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
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_eval(vae),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=_eval(unet),
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
