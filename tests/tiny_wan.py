"""Tiny random diffusers Wan pipelines built from configs (no download): a word-level
tokenizer, a 1-layer UMT5 encoder, a 3-channel-base Wan VAE, a 2-layer Wan transformer, and for
image-to-video a 2-layer CLIP vision encoder."""
from __future__ import annotations

import torch

WORDS = ("<pad> </s> <unk> a an the cat dog red blue runs jumps over in on video of").split()


def _text_and_vae():
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)


def _transformer(head_dim: int, heads: int, layers: int, **kw):
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **kw)


def tiny_wan_pipeline(*, head_dim: int = 12, heads: int = 2, layers: int = 2, seed: int = 0):
    """Text-to-video: diffusers' `WanPipeline`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    torch.manual_seed(seed)
    return WanPipeline(**_text_and_vae(), transformer=_transformer(head_dim, heads, layers,
                                                                   in_channels=16),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def tiny_wan_i2v_pipeline(*, head_dim: int = 12, heads: int = 2, layers: int = 2, seed: int = 0):
    """Image-to-video: diffusers' `WanImageToVideoPipeline` (CLIP image tokens through the
    transformer's image branch, the first frame's latents as extra input channels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16))
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    transformer = _transformer(head_dim, heads, layers, in_channels=36, image_dim=16,
                               added_kv_proj_dim=head_dim * heads)
    return WanImageToVideoPipeline(**_text_and_vae(), transformer=transformer,
                                   image_encoder=image_encoder, image_processor=processor,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
