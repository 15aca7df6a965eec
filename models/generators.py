"""The per-modality generators: each is a tokenizer, a codec and a media writer on the shared
`FlowMatchingModule` (models/flow_module.py), picked in YAML as ``models.generators.<Name>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.media import audio as media_audio
from datamodules.media import image as image_media
from datamodules.media import video as media
from datamodules.media.mesh import save_meshes
from datamodules.media.spec import agree
from models.codecs.mel import MelCodec
from models.codecs.shape import ShapeLatents
from models.conditioning import ClassLabel, Condition
from models.flow_module import FlowMatchingModule
from models.tokenizers.audio import AudioFrames
from models.tokenizers.image import ImagePatches
from models.tokenizers.shape import LatentSet
from models.tokenizers.video import VideoPatches
from models.tokens import Tokens
from models.training import OptimConfig

__all__ = ["AudioFlow", "AudioVideoFlow", "FlowMatchingModule", "ImageFlow", "OptimConfig", "ShapeFlow", "VideoFlow"]


class ImageFlow(FlowMatchingModule):
    """Class- or text-conditional image generator (pixel space by default)."""

    media_suffix = ".png"

    def __init__(
        self,
        tokenizer: ImagePatches = ImagePatches(),
        conditioning: Condition = ClassLabel(),
        **kwargs: Any,
    ):
        super().__init__(tokenizer=tokenizer, conditioning=conditioning, **kwargs)

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return image_media.save_images(x, out_dir, prefix, upscale=max(1, 256 // x.shape[-1]))


class VideoFlow(FlowMatchingModule):
    """Class- or text-conditional video generator (pixel space): 3D patches, 3D RoPE, clips of mixed
    lengths packed in one batch; samples written as MP4."""

    media_suffix = ".mp4"

    def __init__(
        self,
        tokenizer: VideoPatches = VideoPatches(),
        conditioning: Condition = ClassLabel(),
        fps: int = 8,
        **kwargs: Any,
    ):
        """fps: frame rate of the written MP4 files; other arguments as FlowMatchingModule."""
        super().__init__(tokenizer=tokenizer, conditioning=conditioning, **kwargs)
        self.fps = fps

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return media.save_videos(x, out_dir, prefix, fps=self.fps, upscale=max(1, 128 // x.shape[-1]))


def audio_stream(tokenizer: AudioFrames, codec: MelCodec | None, sample_rate: int, keys: tuple[str, str],
                 frames: int | None = None) -> tuple[AudioFrames, MelCodec]:
    """An audio stream's codec at the model's ``sample_rate`` (MelCodec's defaults when None) and its tokenizer
    with channels = the codec's n_mels and ``frames`` (None: the tokenizer's, else its default).

    ``keys``: the tokenizer's and the codec's config keys. Each value is stated once: a stated one
    that contradicts the model's is one ValueError line naming both."""
    tok_key, codec_key = keys
    mel = (codec or MelCodec()).at_rate(sample_rate, codec_key)
    channels = agree(f"{tok_key}.channels", tokenizer.channels, mel.n_mels, f"the codec's n_mels ({codec_key}.n_mels)")
    return replace(tokenizer, channels=channels, frames=frames or tokenizer.frames or tokenizer.default_frames), mel


class AudioFlow(FlowMatchingModule):
    """Class- or text-conditional audio generator on log-mel frames: 1-D patches with 1-D RoPE over
    time, clips of mixed durations packed in one batch; samples written as WAV (Griffin-Lim phase)."""

    media_suffix = ".wav"

    def __init__(
        self,
        tokenizer: AudioFrames = AudioFrames(),
        conditioning: Condition = ClassLabel(),
        sample_rate: int = 8000,
        codec: MelCodec | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            tokenizer: Mel-frame patches; its channels follow the codec's n_mels.
            sample_rate: Rate of the training audio (the data transform follows it) and of the WAVs.
            codec: Log-mel codec at sample_rate (leave its sample_rate out); None = MelCodec defaults.
            Other arguments as FlowMatchingModule.
        """
        tok, mel = audio_stream(tokenizer, codec, sample_rate, ("model.tokenizer", "model.codec"))
        super().__init__(tokenizer=tok, conditioning=conditioning, codec=mel, **kwargs)
        self.sample_rate = sample_rate  # also read by log_media for the W&B audio panel

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return media_audio.save_audio(x, out_dir, self.sample_rate, prefix)


class AudioVideoFlow(FlowMatchingModule):
    """Joint video + audio generator: streams [video, audio, context] in one MM-DiT, each with its own
    weights in the dual-stream blocks and one joint attention over all of them (cross-modal both ways),
    then shared single-stream blocks. Audio tokens sit on the video's time axis (RoPE), so a sound
    and the frame it belongs to share a position. Batches: ``x`` video (3, T, H, W), ``audio`` (S,)
    of the clip's duration (datamodules.audiovideo.AudioVideoTransform). Samples: MP4 with sound."""

    media_suffix = ".mp4"
    num_generated = 2
    codec_hparams = ("codec", "audio_codec")

    def __init__(
        self,
        tokenizer: VideoPatches = VideoPatches(),
        audio_tokenizer: AudioFrames = AudioFrames(),
        conditioning: Condition = ClassLabel(),
        fps: int = 8,
        sample_rate: int = 8000,
        audio_codec: MelCodec | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            tokenizer: Video patches (3-D RoPE: t, row, col; the backbone's rope_axes follow it).
            audio_tokenizer: Mel-frame patches; channels follow the codec's n_mels and `frames` the video's
                duration (tokenizer.frames / fps seconds): leave both out.
            fps: Frame rate of the data (the data transform follows it) and of the written MP4s.
            sample_rate: Audio rate of the data (the data transform follows it) and of the MP4 soundtracks.
            audio_codec: Log-mel codec at sample_rate (leave its sample_rate out); None = MelCodec defaults.
            Other arguments as FlowMatchingModule.
        """
        mel = (audio_codec or MelCodec()).at_rate(sample_rate, "model.audio_codec")
        expected = tokenizer.frames * sample_rate / fps / mel.hop  # mel frames as long as the video
        stated, patch = audio_tokenizer.frames, audio_tokenizer.patch
        if stated is not None and abs(stated - expected) > patch:
            raise ValueError(
                f"model.audio_tokenizer.frames={stated}: expected about {expected:.1f} mel frames, as long as "
                f"model.tokenizer.frames={tokenizer.frames} video frames at fps={fps} (sample_rate={sample_rate}, "
                f"hop={mel.hop}); leave it out: it is derived"
            )
        audio_tok, mel = audio_stream(audio_tokenizer, mel, sample_rate, ("model.audio_tokenizer", "model.audio_codec"),
                                      frames=stated or max(patch, round(expected / patch) * patch))
        super().__init__(tokenizer=tokenizer, conditioning=conditioning, **kwargs)
        self.add_stream("audio", audio_tok, mel, config_key="model.audio_tokenizer")
        self.fps, self.sample_rate = fps, sample_rate

    def audio_positions(self, pos: Tensor) -> Tensor:
        """Audio token index (B, N, 1) -> (B, N, 3) positions (t, 0, 0), t in video tokens (tubelets).

        A token's time is the centre of its mel frames (frame f is centred on sample f * hop); video
        token j spans frames j k .. j k + k - 1 (k = tpatch), frame i shown at i / fps."""
        patch, hop, k = self.tokenizers[1].patch, self.codecs[1].hop, self.tokenizer.tpatch
        seconds = (pos * patch + (patch - 1) / 2) * hop / self.sample_rate
        t = (seconds * self.fps - (k - 1) / 2) / k
        return torch.nn.functional.pad(t, (0, 2))  # no height or width

    def velocity_tokens(self, xs: list[Tokens], t: Tensor, cond: dict[str, Any], drop: Tensor) -> list[Tensor]:
        video, audio = xs
        return super().velocity_tokens([video, replace(audio, pos=self.audio_positions(audio.pos))], t, cond, drop)

    def save_media(self, x: tuple[Tensor, Tensor], out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        video, audio = x
        return media.save_videos(video, out_dir, prefix, fps=self.fps, upscale=max(1, 128 // video.shape[-1]),
                                 audio=audio, sample_rate=self.sample_rate)


class ShapeFlow(FlowMatchingModule):
    """Class- or text-conditional 3D shape generator in the latent-set space of a trained shape
    autoencoder: K latent vectors as K tokens without positions (a set, no RoPE), trained on
    pre-encoded latent shards; samples decoded to occupancy grids and written as PLY meshes."""

    media_suffix = ".ply"

    def __init__(
        self,
        codec: ShapeLatents,
        tokenizer: LatentSet | None = None,
        conditioning: Condition = ClassLabel(),
        **kwargs: Any,
    ):
        """
        Args:
            codec: The frozen autoencoder whose latents the shards hold (ShapeLatents with its ckpt).
            tokenizer: Latent-set tokenizer; None = the codec's (K, d). Given, it must match the codec.
            Other arguments as FlowMatchingModule.
        """
        tokenizer = tokenizer or LatentSet(*codec.latent_shape)
        if tokenizer.latent_shape() != codec.latent_shape:
            raise ValueError(f"ShapeFlow: tokenizer latents (K, d) = {tokenizer.latent_shape()} but the codec's "
                             f"autoencoder makes {codec.latent_shape}; drop model.init_args.tokenizer to follow the codec")
        super().__init__(tokenizer=tokenizer, conditioning=conditioning, codec=codec, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        codec = checkpoint.get("hyper_parameters", {}).get("codec")
        if isinstance(codec, dict) and isinstance(codec.get("init_args"), dict):  # the decoder's sizes travel too
            codec["init_args"]["autoencoder"] = dataclasses.asdict(self.codec.ae.cfg)

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return save_meshes(x, out_dir, prefix)
