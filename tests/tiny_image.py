"""Tiny random diffusers image pipelines built from configs (no download): FLUX.1 (CLIP + T5
text encoders, a one-block KL VAE, a 1 + 2 block FLUX transformer with the distilled guidance
embedding) and Qwen-Image (a 1-layer Qwen2.5-VL text encoder, Qwen-Image's VAE, a 2-block
transformer). The tokenizers are word-level over a few words (every other word is <unk>)."""
from __future__ import annotations

import torch

WORDS = ("<pad> </s> <unk> a an the cat dog red blue runs jumps over in on image of").split()


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def tiny_flux_pipeline(*, seed: int = 0, guidance_embeds: bool = True):
    """diffusers' `FluxPipeline` (FLUX.1-dev layout: `guidance_embeds=True`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
        eos_token_id=1, pad_token_id=0)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                        scaling_factor=1.5)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=_tokenizer(16),
                        text_encoder_2=t5, tokenizer_2=_tokenizer(32), transformer=transformer)


def tiny_qwen_image_pipeline(*, seed: int = 0):
    """diffusers' `QwenImagePipeline` (true CFG with the per-token norm rescale)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(WORDS),
                         bos_token_id=0, eos_token_id=1, pad_token_id=0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                       "type": "default"}, rope_theta=1e6),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16),
        hidden_size=16, vocab_size=len(WORDS), vision_start_token_id=len(WORDS),
        vision_end_token_id=len(WORDS) + 1, vision_token_id=len(WORDS) + 2,
        image_token_id=len(WORDS) + 3, video_token_id=len(WORDS) + 4)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                            max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    return QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder,
                             tokenizer=_tokenizer(64), transformer=transformer)
