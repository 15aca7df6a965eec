"""How samples lie in the stream tensors: a regular (padded) batch or a packed one.

Packing (NaViT) puts variable-length samples end to end in one sequence instead of padding
them to the longest; attention then uses a block-diagonal mask (see `models/attention.py`).
With several streams (e.g. [x, ctx]) each stream is packed on its own, and `join` reorders
the concatenation so every sample's tokens of all streams are contiguous for joint attention.

Legend: S samples, B batch (== S when regular, 1 when packed), N_s tokens of stream s,
N tokens of the joined sequence, F trailing features (any number of trailing dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class _Index:
    """Index tensors of a packed layout, on one device."""

    sample: list[Tensor]  # per stream (N_s,) token -> sample
    join: Tensor  # (N,) position in cat(streams) of each joined token
    split: Tensor  # (N,) inverse of `join`
    joint_sample: Tensor  # (N,) joined token -> sample


@dataclass
class Layout:
    """How samples lie in the stream tensors.

    lengths=None: padded/regular batch, every stream tensor is (B, N_s, ...).
    lengths given: packed, every stream tensor is (1, sum_i lengths[s][i], ...) and sample i
    owns lengths[s][i] consecutive tokens of stream s.
    """

    lengths: list[list[int]] | None = None
    """Tokens per [stream][sample]; None for a regular batch."""
    _cache: dict[torch.device, _Index] = field(default_factory=dict, init=False, repr=False, compare=False)
    _sizes: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.lengths is None:
            return
        self.lengths = [[int(n) for n in stream] for stream in self.lengths]
        if not self.lengths:
            raise ValueError("Layout.lengths: expected at least one stream, got []")
        n_samples = {len(stream) for stream in self.lengths}
        if len(n_samples) != 1 or 0 in n_samples:
            raise ValueError(
                f"Layout.lengths: every stream needs the same (non-zero) number of samples, got {sorted(n_samples)}"
            )
        if any(n < 0 for stream in self.lengths for n in stream):
            raise ValueError(f"Layout.lengths: token counts must be >= 0, got {self.lengths}")
        self._cache[torch.device("cpu")] = self._build_index()

    @staticmethod
    def packed(lengths: list[list[int]]) -> "Layout":
        """A packed layout; `lengths[s][i]` tokens of stream s belong to sample i."""
        return Layout(lengths=lengths)

    @property
    def is_packed(self) -> bool:
        return self.lengths is not None

    def num_samples(self) -> int | None:
        return None if self.lengths is None else len(self.lengths[0])

    def joint_seqlens(self) -> list[int] | None:
        """Per-sample length of the joined sequence (all streams), None if regular."""
        if self.lengths is None:
            return None
        return [sum(per_stream) for per_stream in zip(*self.lengths)]

    def joint_sample(self, device: torch.device | str) -> Tensor | None:
        """(N,) the sample of each token of the joined sequence on `device`, None if regular."""
        return None if self.lengths is None else self._index(torch.device(device)).joint_sample

    def stream_seqlens(self, stream: int) -> list[int] | None:
        return None if self.lengths is None else list(self.lengths[stream])

    def to(self, device: torch.device | str) -> "Layout":
        """Make the index tensors available on `device` (cached); returns self."""
        if self.lengths is not None:
            self._index(torch.device(device))
        return self

    # ---------------------------------------------------------------- tensor ops

    def expand(self, per_sample: Tensor, stream: int) -> Tensor:
        """Spread per-sample values over the tokens of one stream.

        per_sample (S, F...) -> regular (S, 1, F...) (broadcasts over tokens),
        packed (1, N_s, F...) gathered by each token's sample.
        """
        if self.lengths is None:
            return per_sample.unsqueeze(1)
        idx = self._index(per_sample.device).sample[stream]  # (N_s,)
        return per_sample.index_select(0, idx).unsqueeze(0)

    def join(self, xs: list[Tensor]) -> Tensor:
        """Concatenate streams along dim 1 so each sample's tokens are contiguous.

        regular: cat(xs, 1). packed: tokens ordered [s0 of sample 0, s1 of sample 0, ...,
        s0 of sample 1, ...], which is what a block-diagonal mask over `joint_seqlens` needs.
        """
        self._check_streams(xs)
        self._sizes = [x.shape[1] for x in xs]
        x = torch.cat(xs, dim=1)  # (B, N, F...)
        if self.lengths is None:
            return x
        return x.index_select(1, self._index(x.device).join)

    def split(self, x: Tensor, sizes: Sequence[int] | None = None) -> list[Tensor]:
        """Exact inverse of `join`.

        A regular layout does not know the stream lengths: they come from `sizes` or, if not
        given, from the last `join` on this layout.
        """
        if self.lengths is not None:
            totals = [sum(stream) for stream in self.lengths]
            if sizes is not None and list(sizes) != totals:
                raise ValueError(f"Layout.split: sizes {list(sizes)} do not match the packed lengths {totals}")
            x = x.index_select(1, self._index(x.device).split)
            return list(x.split(totals, dim=1))
        sizes = sizes if sizes is not None else self._sizes
        if sizes is None:
            raise ValueError("Layout.split on a regular layout needs the stream sizes: pass sizes= or call join first")
        if sum(sizes) != x.shape[1]:
            raise ValueError(f"Layout.split: sizes {list(sizes)} sum to {sum(sizes)}, tensor has {x.shape[1]} tokens")
        return list(x.split(list(sizes), dim=1))

    # ---------------------------------------------------------------- internals

    def _check_streams(self, xs: list[Tensor]) -> None:
        if self.lengths is None:
            return
        if len(xs) != len(self.lengths):
            raise ValueError(f"Layout: got {len(xs)} streams, layout has {len(self.lengths)}")
        for s, (x, lens) in enumerate(zip(xs, self.lengths)):
            if x.shape[0] != 1 or x.shape[1] != sum(lens):
                raise ValueError(
                    f"Layout: stream {s} has shape {tuple(x.shape)}, packed layout expects (1, {sum(lens)}, ...)"
                )

    def _index(self, device: torch.device) -> _Index:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._cache:
            cpu = self._cache[torch.device("cpu")]
            self._cache[device] = _Index(
                sample=[t.to(device) for t in cpu.sample],
                join=cpu.join.to(device),
                split=cpu.split.to(device),
                joint_sample=cpu.joint_sample.to(device),
            )
        return self._cache[device]

    def _build_index(self) -> _Index:
        assert self.lengths is not None
        sample = [
            torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
            for lens in self.lengths
        ]
        # start of each (stream, sample) segment inside cat(streams)
        stream_offset = 0
        starts: list[list[int]] = []
        for lens in self.lengths:
            offs, o = [], stream_offset
            for n in lens:
                offs.append(o)
                o += n
            starts.append(offs)
            stream_offset = o
        join = [
            torch.arange(starts[s][i], starts[s][i] + self.lengths[s][i])
            for i in range(len(self.lengths[0]))
            for s in range(len(self.lengths))
        ]
        join_t = torch.cat(join) if join else torch.zeros(0, dtype=torch.long)
        split_t = torch.empty_like(join_t)
        split_t[join_t] = torch.arange(join_t.numel())
        joint_sample = torch.repeat_interleave(torch.arange(len(self.lengths[0])),
                                               torch.tensor(self.joint_seqlens(), dtype=torch.long))
        return _Index(sample=sample, join=join_t, split=split_t, joint_sample=joint_sample)
