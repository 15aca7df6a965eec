"""Tiny random instances of the real diffusers autoencoders and transformers text encoders, saved with
save_pretrained: what the tests load through duoflow's own code (no download, ever)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLLTXVideo, AutoencoderKLWan, AutoencoderOobleck
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def tiny_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ltx = AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False), upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=2,
        patch_size_t=1, down_block_types=("LTXVideoDownBlock3D",) * 2, downsample_type=("conv", "conv"), scaling_factor=0.5,
    )
    ltx.latents_mean.copy_(torch.tensor([0.2, 0.0, -0.1, 0.4]))
    ltx.latents_std.copy_(torch.tensor([2.0, 1.0, 0.5, 1.5]))
    return {
        "kl": AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1, scaling_factor=1.5, shift_factor=0.1,
        ),
        "dc": AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
            decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate",
            downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.4,
        ),
        "wan": AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=WAN_MEAN, latents_std=WAN_STD,
        ),
        "ltx": ltx,
        "oobleck": AutoencoderOobleck(
            encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2], decoder_channels=8,
            decoder_input_channels=4, audio_channels=2, sampling_rate=8000,
        ),
    }


def save_autoencoders(root: Path) -> dict[str, Path]:
    """name -> folder; the KL one in a pipeline layout (``vae/`` sub-folder), like SD3/Flux."""
    made = {}
    for name, model in tiny_models().items():
        made[name] = root / name
        model.save_pretrained(made[name] / "vae" if name == "kl" else made[name])
    return made


CAPTIONS = ["a red circle on the left", "a blue square moving up", "a green triangle", "the dog runs", ""]


def word_tokenizer(special: list[str], template: str, **tokens: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of CAPTIONS' words; ``template`` adds the special tokens around $A."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, tok.token_to_id(s)) for s in special if s in template],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **tokens)


def save_text_encoders(root: Path) -> dict[str, Path]:
    """t5: a flat folder; sd3: a pipeline layout (text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/); bert."""
    torch.manual_seed(0)
    t5_tok = word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>")
    T5EncoderModel(T5Config(
        vocab_size=t5_tok.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
    )).save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    clip_tok = word_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], "<s> $A </s>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    clip = {"vocab_size": clip_tok.vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=12)).save_pretrained(root / "sd3" / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**{**clip, "hidden_size": 8, "num_attention_heads": 2})).save_pretrained(root / "sd3" / "text_encoder_2")
    clip_tok.save_pretrained(root / "sd3" / "tokenizer")
    clip_tok.save_pretrained(root / "sd3" / "tokenizer_2")
    bert_tok = word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "<unk>"], "[CLS] $A [SEP]", pad_token="[PAD]")
    BertModel(BertConfig(vocab_size=bert_tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    return {"t5": root / "t5", "sd3": root / "sd3", "bert": root / "bert"}
