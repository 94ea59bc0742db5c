"""Tiny random diffusers HunyuanVideo and LTX-Video pipelines built from configs (no download):
word-level tokenizers over a few words, 1-2 layer Llama / CLIP / T5 text encoders, small VAEs
with their real compression ratios, 1-2 block transformers."""
from __future__ import annotations

import torch

from tests.tiny_image import WORDS, _tokenizer


def tiny_hunyuan_video_pipeline(*, seed: int = 0):
    """diffusers' `HunyuanVideoPipeline` (Llama + CLIP text encoders, distilled guidance)."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=8, bos_token_id=0,
        eos_token_id=1, pad_token_id=0)).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
        spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=_tokenizer(512),
                                transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip, tokenizer_2=_tokenizer(77))


def tiny_ltx_pipeline(*, seed: int = 0, timestep_conditioning: bool = False):
    """diffusers' `LTXPipeline` (T5 text encoder, batched CFG); timestep_conditioning: a VAE
    decoder conditioned on the decode timestep (LTX-Video 0.9.1 on)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from diffusers import LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, timestep_conditioning=timestep_conditioning, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True,
                                            base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096)
    return LTXPipeline(scheduler=sched, vae=vae, text_encoder=t5, tokenizer=_tokenizer(128),
                       transformer=transformer)
