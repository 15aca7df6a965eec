"""How samples lie in the stream tensors: a regular (padded) batch or a packed one.

Packing (NaViT) puts variable-length samples end to end in one sequence instead of padding
them to the longest; attention then uses a block-diagonal mask (see `models/attention.py`).
With several streams (e.g. [x, ctx]) each stream is packed on its own, and `join` reorders
the concatenation so every sample's tokens of all streams are contiguous for joint attention.

A packed layout is built once per batch and answers every "which sample is this token"
question from tensors it computes once and caches per device: the segment ids (token ->
sample), `cu_seqlens` (the varlen kernels' offsets) and the join/split orders. `max_seqlen`
is a Python int, so a kernel that needs it costs no device sync and no graph break under
torch.compile. `to(device)` builds them all before the (compiled) blocks run.

Legend: S samples, B batch (== S when regular, 1 when packed), N_s tokens of stream s,
N tokens of the joined sequence, F trailing features (any number of trailing dims).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass
class _Segments:
    """A one-stream packed layout's index tensors, on one device."""

    ids: Tensor  # (N,) token -> sample
    cu_seqlens: Tensor  # (S+1,) int32 start of each sample, then N


@dataclass
class _Order:
    """A multi-stream packed layout's reordering, on one device."""

    join: Tensor  # (N,) position in cat(streams) of each joined token
    split: Tensor  # (N,) inverse of `join`


@dataclass
class Layout:
    """How samples lie in the stream tensors.

    lengths=None: padded/regular batch, every stream tensor is (B, N_s, ...).
    lengths given: packed, every stream tensor is (1, sum_i lengths[s][i], ...) and sample i
    owns lengths[s][i] consecutive tokens of stream s. The lengths must not change afterwards:
    the index tensors derived from them are cached.
    """

    lengths: list[list[int]] | None = None
    """Tokens per [stream][sample]; None for a regular batch."""
    max_seqlen: int = field(default=0, init=False, compare=False)
    """Longest sample of the joined sequence (all streams); 0 when regular."""
    num_tokens: int = field(default=0, init=False, compare=False)
    """Tokens of the joined sequence, sum of all lengths; 0 when regular."""
    _streams: list[Layout] = field(default_factory=list, init=False, repr=False, compare=False)
    _joint: Layout | None = field(default=None, init=False, repr=False, compare=False)
    _segments: dict[torch.device, _Segments] = field(default_factory=dict, init=False, repr=False, compare=False)
    _order: dict[torch.device, _Order] = field(default_factory=dict, init=False, repr=False, compare=False)
    _cached: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        joint = self.joint_seqlens()
        self.max_seqlen, self.num_tokens = max(joint), sum(joint)
        cpu = torch.device("cpu")
        if len(self.lengths) == 1:
            self._streams, self._joint = [self], self
            self._segments[cpu] = self._build_segments()
        else:
            self._streams = [Layout([lens]) for lens in self.lengths]
            self._joint = Layout([joint])
        self._order[cpu] = self._build_order()

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

    def stream_seqlens(self, stream: int) -> list[int] | None:
        return None if self.lengths is None else list(self.lengths[stream])

    # ---------------------------------------------------------------- derived layouts

    def joint(self) -> "Layout":
        """The one-stream layout of the joined sequence (`join`'s output); a one-stream or regular layout is its own."""
        return self if self._joint is None else self._joint

    def stream(self, s: int) -> "Layout":
        """The one-stream layout of stream s; a regular layout is its own."""
        return self if self.lengths is None else self._streams[s]

    # ---------------------------------------------------------------- cached per device

    def segment_ids(self, device: torch.device | str) -> Tensor:
        """(N,) the sample of each token of the joined sequence, on `device` (cached)."""
        return self.joint()._segments_on(device).ids

    def cu_seqlens(self, device: torch.device | str) -> Tensor:
        """(S+1,) int32 offsets of the samples in the joined sequence, [0, n_0, n_0 + n_1, ..., N] (cached)."""
        return self.joint()._segments_on(device).cu_seqlens

    def cached(self, key: Any, build: Callable[[], T]) -> T:
        """`build()` once per layout and key: per-batch state of a kernel (e.g. xformers' block-diagonal mask)."""
        if key not in self._cached:
            self._cached[key] = build()
        return self._cached[key]

    def to(self, device: torch.device | str) -> "Layout":
        """Build every index tensor on `device` now (cached), outside compiled code; returns self."""
        if self.lengths is not None:
            self._order_on(device)
            for layout in {id(lay): lay for lay in (*self._streams, self.joint())}.values():
                layout._segments_on(device)
        return self

    # ---------------------------------------------------------------- tensor ops

    def expand(self, per_sample: Tensor, stream: int = 0) -> Tensor:
        """Spread per-sample values over the tokens of one stream.

        per_sample (S, F...) -> regular (S, 1, F...) (broadcasts over tokens),
        packed (1, N_s, F...) gathered by each token's sample.
        """
        if self.lengths is None:
            return per_sample.unsqueeze(1)
        idx = self.stream(stream).segment_ids(per_sample.device)  # (N_s,)
        return per_sample.index_select(0, idx).unsqueeze(0)

    def join(self, xs: list[Tensor]) -> Tensor:
        """Concatenate streams along dim 1 so each sample's tokens are contiguous.

        regular: cat(xs, 1). packed: tokens ordered [s0 of sample 0, s1 of sample 0, ...,
        s0 of sample 1, ...], which is what a block-diagonal mask over `joint_seqlens` needs.
        """
        self._check_streams(xs)
        x = torch.cat(xs, dim=1)  # (B, N, F...)
        if self.lengths is None:
            return x
        return x.index_select(1, self._order_on(x.device).join)

    def split(self, x: Tensor, sizes: Sequence[int] | None = None) -> list[Tensor]:
        """Exact inverse of `join`: the streams of N_s tokens each.

        A packed layout knows the stream sizes (`sizes`, if given, must match them); a regular
        one does not, so it needs `sizes`.
        """
        if self.lengths is not None:
            totals = [sum(stream) for stream in self.lengths]
            if sizes is not None and list(sizes) != totals:
                raise ValueError(f"Layout.split: sizes {list(sizes)} do not match the packed lengths {totals}")
            x = x.index_select(1, self._order_on(x.device).split)
            return list(x.split(totals, dim=1))
        if sizes is None:
            raise ValueError("Layout.split on a regular layout needs the stream sizes: pass sizes=[N_0, N_1, ...]")
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

    def _segments_on(self, device: torch.device | str) -> _Segments:
        if self.lengths is None:
            raise ValueError("Layout: a regular layout has no segments (token -> sample is the batch index)")
        device = _device(device)
        if device not in self._segments:
            cpu = self._segments[torch.device("cpu")]
            self._segments[device] = _Segments(*(t.to(device, non_blocking=True) for t in (cpu.ids, cpu.cu_seqlens)))
        return self._segments[device]

    def _order_on(self, device: torch.device | str) -> _Order:
        device = _device(device)
        if device not in self._order:
            cpu = self._order[torch.device("cpu")]
            self._order[device] = _Order(*(t.to(device, non_blocking=True) for t in (cpu.join, cpu.split)))
        return self._order[device]

    def _build_segments(self) -> _Segments:
        assert self.lengths is not None and len(self.lengths) == 1
        lens = torch.tensor(self.lengths[0], dtype=torch.long)  # (S,)
        ids = torch.repeat_interleave(torch.arange(len(lens)), lens)  # (N,)
        cu_seqlens = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)  # (S+1,)
        return _Segments(ids, cu_seqlens)

    def _build_order(self) -> _Order:
        assert self.lengths is not None
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
        return _Order(join=join_t, split=split_t)


def _device(device: torch.device | str) -> torch.device:
    """The cache key of a device: "cuda" means the current CUDA device, as tensors' devices name it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
