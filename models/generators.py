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
from datamodules.media.spec import TokenAxis, agree
from models.codecs.base import Codec
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


RATE_UNITS = {"samples": "Hz", "frames": "fps"}


def whole_latent(steps: int, axis: TokenAxis, what: str, unit: str) -> int:
    """Latent frames of ``steps`` media steps (frames, samples) that make whole tokens along ``axis``; one
    ValueError line naming ``what`` asked for them when they make none. The rule of a model's ``seconds``
    (frames_for) and of ``duoflow sample --frames/--seconds``."""
    latent = axis.whole_latent(steps)
    if steps <= 0 or latent < axis.patch:
        raise ValueError(f"{what}: {steps} {unit} make no whole token ({axis.multiple} {unit} each); "
                         "expected a longer duration")
    return latent


def frames_for(seconds: float | None, rate: float, axis: TokenAxis, stated: int | None, keys: tuple[str, str],
               unit: str) -> int | None:
    """Latent frames of a ``seconds`` long sample (``rate`` media steps per second, turned into latent frames
    and tokens by ``axis``), whole tokens only; ``stated`` (the tokenizer's frames) must agree. None: ``stated``.
    ``keys``: the config keys of the seconds and of the frames, for the one-line errors."""
    if seconds is None:
        return stated
    seconds_key, frames_key = keys
    steps = round(seconds * rate)
    latent = whole_latent(steps, axis, f"{seconds_key}={seconds}", unit)
    return agree(frames_key, stated, latent, f"{seconds_key}={seconds} ({steps} {unit} at {rate:g} {RATE_UNITS[unit]})")


class VideoFlow(FlowMatchingModule):
    """Class- or text-conditional video generator (pixel space): 3D patches, 3D RoPE, clips of mixed
    lengths packed in one batch; samples written as MP4."""

    media_suffix = ".mp4"

    def __init__(
        self,
        tokenizer: VideoPatches = VideoPatches(),
        conditioning: Condition = ClassLabel(),
        fps: int = 8,
        seconds: float | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            fps: Frame rate of the clips and of the written MP4 files.
            seconds: Length of the clips sampled (and the longest training clip by default): frames = seconds x fps,
                rounded down to whole tokens; model.tokenizer.frames is then derived (leave it out). None: the
                tokenizer's frames.
            Other arguments as FlowMatchingModule.
        """
        tok = video_tokenizer(tokenizer, kwargs.get("codec"), fps, seconds)
        super().__init__(tokenizer=tok, conditioning=conditioning, **kwargs)
        self.fps = fps

    def save_media(self, x: Tensor, out_dir: str | Path, prefix: str = "sample") -> list[Path]:
        return media.save_videos(x, out_dir, prefix, fps=self.fps, upscale=max(1, 128 // x.shape[-1]))


def video_tokenizer(tokenizer: VideoPatches, codec: Codec | None, fps: float, seconds: float | None) -> VideoPatches:
    """The video tokenizer with its latent frames set from ``seconds`` at ``fps`` (a codec's causal 1 + k m frames
    counted), or as stated."""
    axis = tokenizer.media(codec, "model.tokenizer")["time"]
    frames = frames_for(seconds, fps, axis, tokenizer.frames, ("model.seconds", "model.tokenizer.frames"), "frames")
    return replace(tokenizer, frames=frames or tokenizer.length)


def audio_stream(tokenizer: AudioFrames, codec: Codec | None, sample_rate: int | None, keys: tuple[str, str],
                 frames: int | None = None) -> tuple[AudioFrames, Codec, int]:
    """An audio stream: (its tokenizer, its codec, the audio rate).

    The rate is the model's ``sample_rate``, else the codec's own (a pretrained audio autoencoder runs at
    the rate it was trained at), else 8000; the codec runs at it (MelCodec: its defaults when None). The
    tokenizer's channels are the codec's latent channels and its ``frames`` the given ones (None: the
    tokenizer's, else its default). ``keys``: the tokenizer's and the codec's config keys. Each value is
    stated once: a stated one that contradicts is one ValueError line naming both."""
    tok_key, codec_key = keys
    codec = codec or MelCodec()
    rate = sample_rate or codec.native_sample_rate or 8000
    codec = codec.at_rate(rate, codec_key)
    source = (f"the codec's n_mels ({codec_key}.n_mels)" if isinstance(codec, MelCodec)
              else f"the codec's latent channels ({codec_key})")
    channels = agree(f"{tok_key}.channels", tokenizer.channels, codec.latent_channels, source)
    return replace(tokenizer, channels=channels, frames=frames or tokenizer.frames or tokenizer.default_frames), codec, rate


class AudioFlow(FlowMatchingModule):
    """Class- or text-conditional audio generator on log-mel frames (Griffin-Lim to listen) or on the
    latents of a pretrained audio autoencoder (Oobleck): 1-D patches with 1-D RoPE over time, clips of
    mixed durations packed in one batch; samples written as WAV."""

    media_suffix = ".wav"

    def __init__(
        self,
        tokenizer: AudioFrames = AudioFrames(),
        conditioning: Condition = ClassLabel(),
        sample_rate: int | None = None,
        codec: Codec | None = None,
        seconds: float | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            tokenizer: Latent-frame patches; its channels follow the codec's latent channels.
            seconds: Length of the clips sampled by default: latent frames = the codec's frames of seconds x
                sample_rate samples, rounded down to whole tokens; model.tokenizer.frames is then derived
                (leave it out). None: the tokenizer's frames, else 64.
            sample_rate: Rate of the training audio (the data transform follows it) and of the WAVs;
                None: the codec's own (a pretrained autoencoder's), else 8000.
            codec: MelCodec (leave its sample_rate out; None = its defaults) or a pretrained audio
                autoencoder (models.codecs.pretrained.PretrainedAutoencoder: AutoencoderOobleck).
            Other arguments as FlowMatchingModule.
        """
        tok, codec, rate = audio_stream(tokenizer, codec, sample_rate, ("model.tokenizer", "model.codec"))
        axis = tok.media(codec, "model.tokenizer")["samples"]
        frames = frames_for(seconds, rate, axis, tokenizer.frames, ("model.seconds", "model.tokenizer.frames"), "samples")
        tok = replace(tok, frames=frames or tok.frames)
        super().__init__(tokenizer=tok, conditioning=conditioning, codec=codec, **kwargs)
        self.sample_rate = rate

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
        sample_rate: int | None = None,
        audio_codec: Codec | None = None,
        seconds: float | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            tokenizer: Video patches (3-D RoPE: t, row, col; the backbone's rope_axes follow it).
            audio_tokenizer: Mel-frame patches; channels follow the codec's n_mels and `frames` the video's
                duration (tokenizer.frames / fps seconds): leave both out.
            fps: Frame rate of the data (the data transform follows it) and of the written MP4s.
            sample_rate: Audio rate of the data (the data transform follows it) and of the MP4 soundtracks;
                None: the audio codec's own (a pretrained autoencoder's), else 8000.
            audio_codec: MelCodec (leave its sample_rate out; None = its defaults) or a pretrained audio
                autoencoder (PretrainedAutoencoder: AutoencoderOobleck).
            seconds: Length of the clips sampled, as VideoFlow's (the soundtrack follows the frames).
            Other arguments as FlowMatchingModule.
        """
        video_tok = video_tokenizer(tokenizer, kwargs.get("codec"), fps, seconds)
        _, codec, rate = audio_stream(audio_tokenizer, audio_codec, sample_rate, ("model.audio_tokenizer", "model.audio_codec"))
        video_frames = video_tok.media(kwargs.get("codec"), "model.tokenizer")["frames"]  # a causal codec: 1 + k (F - 1)
        expected = video_frames * rate / fps / codec.hop  # latent audio frames as long as the video
        stated, patch = audio_tokenizer.frames, audio_tokenizer.patch
        if stated is not None and abs(stated - expected) > patch:
            raise ValueError(
                f"model.audio_tokenizer.frames={stated}: expected about {expected:.1f} latent frames, as long as "
                f"model.tokenizer.frames={video_tok.frames} latent ({video_frames} video) frames at fps={fps} (sample_rate={rate}, "
                f"hop={codec.hop}); leave it out: it is derived"
            )
        audio_tok, codec, _ = audio_stream(audio_tokenizer, codec, rate, ("model.audio_tokenizer", "model.audio_codec"),
                                           frames=stated or max(patch, round(expected / patch) * patch))
        super().__init__(tokenizer=video_tok, conditioning=conditioning, **kwargs)
        self.add_stream("audio", audio_tok, codec, config_key="model.audio_tokenizer")
        self.fps, self.sample_rate = fps, rate

    def audio_positions(self, pos: Tensor) -> Tensor:
        """Audio token index (B, N, 1) -> (B, N, 3) positions (t, 0, 0), t in video tokens (tubelets).

        A token's time is the centre of its latent audio frames (frame f centred on sample f * hop);
        video frame i is shown at i / fps; a causal video codec of temporal factor s (1: pixels) makes
        latent frame i of frames s i - s + 1 .. s i (the first frame alone), centred on s i - (s - 1) / 2;
        video token j spans latent frames j k .. j k + k - 1 (k = tpatch)."""
        patch, hop, k = self.tokenizers[1].patch, self.codecs[1].hop, self.tokenizer.tpatch
        s = int(self.codec.temporal_factor)
        seconds = (pos * patch + (patch - 1) / 2) * hop / self.sample_rate
        latent_frame = (seconds * self.fps + (s - 1) / 2) / s
        t = (latent_frame - (k - 1) / 2) / k
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
