"""Log-mel first stage for audio: waveform <-> (n_mels, F) image-like latent, no learned weights.

Letters: B batch, S samples, K STFT bins (n_fft // 2 + 1), M mel bins, F frames.

Fixed normalisation (stateless, so ``encode`` is deterministic and needs no dataset statistics):
the STFT magnitude is scaled by 2 / sum(window), so that a full-scale sine has magnitude 1 in its
bin; its mel projection ``m`` is clamped to ``log_floor`` and mapped affinely in log space,

    z = 1 - 2 * log(m) / log(log_floor)        (m = log_floor -> -1,  m = 1 -> +1)

so silence sits at -1 and a loud tone a little above +1. ``decode`` inverts the map, solves the
mel projection by least squares as torchaudio's ``InverseMelScale`` does (minimum-norm solution,
negative values set to 0) and recovers a phase with Griffin-Lim started from zero phase
(``rand_init=False``), so decoding is deterministic too.

Frames follow ``center=True``: ``F = S // hop + 1`` and ``samples(F) = (F - 1) * hop``, so a
decoded clip is the input rounded down to a whole hop.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torchaudio.functional as AF
from torch import Tensor

from datamodules.media.spec import agree
from models.codecs.base import Codec


class MelCodec(Codec):
    """Waveform (B, S) in [-1, 1] <-> normalised log-mel (B, M, F); buffers only, none saved.

    Args:
        sample_rate: Sample rate of the waveforms (Hz); None: the generator's ``sample_rate`` (8000
            alone). Stated, it must equal the generator's.
        n_fft: STFT size (window length); its frequency resolution is sample_rate / n_fft.
        hop: STFT hop in samples (one latent frame).
        n_mels: Mel bins (the latent's channels).
        griffin_lim_iters: Griffin-Lim iterations in ``decode``.
        log_floor: Smallest mel magnitude kept; maps to -1.
        inverse_iters: Non-negative least-squares refinements of the mel inversion in ``decode``
            (0 = torchaudio's InverseMelScale solution as is).
    """

    extra_frames: ClassVar[int] = 1
    """Latent frames beyond samples // hop (``center=True``: F = S // hop + 1), for the token count of a clip."""

    def __init__(
        self,
        sample_rate: int | None = None,
        n_fft: int = 512,
        hop: int = 128,
        n_mels: int = 40,
        griffin_lim_iters: int = 32,
        log_floor: float = 1e-5,
        inverse_iters: int = 200,
    ):
        super().__init__()
        if not 0 < hop <= n_fft:
            raise ValueError(f"MelCodec: hop={hop} must be in (0, n_fft={n_fft}]")
        if not 0 < log_floor < 1:
            raise ValueError(f"MelCodec: log_floor={log_floor} must be in (0, 1)")
        self.stated_sample_rate = sample_rate
        sample_rate = sample_rate or 8000
        self.sample_rate, self.n_fft, self.hop, self.n_mels = sample_rate, n_fft, hop, n_mels
        self.griffin_lim_iters, self.inverse_iters = griffin_lim_iters, inverse_iters
        self.log_floor = log_floor
        window = torch.hann_window(n_fft)
        fbank = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)  # (K, M)
        # computed from the arguments, so non-persistent: checkpoints do not depend on them
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fbank", fbank, persistent=False)
        self.register_buffer("fbank_pinv", torch.linalg.pinv(fbank.T.double()).float(), persistent=False)  # (K, M)
        self.magnitude_scale = 2.0 / float(window.sum())

    def at_rate(self, sample_rate: int, key: str) -> MelCodec:
        """This codec at the generator's ``sample_rate`` (rebuilt when its own was left unset); a stated
        rate must equal it. ``key``: the codec's config key, for the error."""
        agree(f"{key}.sample_rate", self.stated_sample_rate, sample_rate, "the model's sample_rate (model.sample_rate)")
        if sample_rate == self.sample_rate:
            return self
        return MelCodec(sample_rate, self.n_fft, self.hop, self.n_mels, self.griffin_lim_iters, self.log_floor,
                        self.inverse_iters)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent: the mel bins."""
        return self.n_mels

    def frames(self, samples: int) -> int:
        """Latent frames F for a clip of ``samples`` samples."""
        return samples // self.hop + self.extra_frames

    def samples(self, frames: int) -> int:
        """Samples that ``decode`` returns for ``frames`` latent frames."""
        return (frames - 1) * self.hop

    def encode(self, wave: Tensor) -> Tensor:
        """(B, S) waveform -> (B, M, F) log-mel in about [-1, 1]."""
        spec = AF.spectrogram(
            wave.float(), pad=0, window=self.window, n_fft=self.n_fft, hop_length=self.hop,
            win_length=self.n_fft, power=1.0, normalized=False, center=True, pad_mode="reflect",
        )  # (B, K, F) magnitude
        mel = self.fbank.T @ (spec * self.magnitude_scale)  # (B, M, F)
        return 1.0 - 2.0 * mel.clamp_min(self.log_floor).log() / math.log(self.log_floor)

    def decode(self, mel: Tensor) -> Tensor:
        """(B, M, F) normalised log-mel -> (B, (F - 1) * hop) waveform (Griffin-Lim phase)."""
        magnitude = torch.exp((1.0 - mel.float()) / 2.0 * math.log(self.log_floor))  # (B, M, F)
        spec = self.inverse_mel(magnitude)  # (B, K, F)
        wave = AF.griffinlim(
            spec / self.magnitude_scale, self.window, self.n_fft, self.hop, self.n_fft, power=1.0,
            n_iter=self.griffin_lim_iters, momentum=0.99, length=self.samples(mel.shape[-1]), rand_init=False,
        )
        return wave.clamp(-1.0, 1.0)

    def inverse_mel(self, mel: Tensor) -> Tensor:
        """(B, M, F) mel magnitude -> (B, K, F) non-negative linear magnitude whose projection is ``mel``."""
        spec = (self.fbank_pinv @ mel).clamp_min(0.0) + 1e-8  # InverseMelScale's solution
        target = self.fbank @ mel  # A^T m, with A = fbank^T (M, K)
        for _ in range(self.inverse_iters):  # Lee-Seung update for min ||A s - m||, s >= 0
            spec = (spec * target / (self.fbank @ (self.fbank.T @ spec) + 1e-12)).clamp_min(1e-30)  # no subnormals: slow on CPU
        return spec
