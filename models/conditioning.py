"""Conditions: what the generated stream attends to (context tokens) and a pooled vector for adaLN.

Letters: B batch, L context tokens, D model width.
Each condition is a small config dataclass (picked in YAML by class_path) whose `build(dim)`
makes the trainable module once the backbone width is known, so the width is set in one place.
Every condition has a null value (dropped condition) for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.text_encoders import TextEncoders, TextEncoderSpec

Context = Tensor | list[Tensor]
"""Context tokens: (B, L, D) when every sample has L, else B tensors (L_b, D) (captions of their own
lengths: packed with the other streams, so padding is never attended to)."""


class ConditionModule(nn.Module):
    """forward(cond, drop) -> (context tokens, pooled (B, D)); drop (B,) bool selects the null condition.

    `drop` comes from the host (FlowMatchingModule draws it there): a condition that decides per
    sample in Python (captions of their own lengths) reads it without stalling the GPU, and one that
    works on the device moves it there without a read. Nothing in forward reads a device value: a
    read would wait for the GPU at every training step (tests/test_host_syncs.py)."""

    fingerprints: list[str] = []
    """Of pretrained text encoders' folders (recorded in checkpoints, checked against cached embeddings)."""
    num_classes: int | None = None
    """Classes of a class-conditional model (labels 0..num_classes-1); None: conditioned on something else."""

    def forward(self, cond: dict[str, Any], drop: Tensor) -> tuple[Context, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def preview(self, num: int, captions: Sequence[str] = ()) -> dict[str, Any]:
        """Conditions for `num` preview samples that show what the model learned; ``captions``: training
        captions a text model uses when its config states no prompts."""
        return {}

    def check(self, cond: dict[str, Any]) -> None:
        """Raise one clear line for conditions this module cannot take. Called on the host, before a batch
        moves to the device (and once per sampling run), never in forward: there it would be a device read."""

    def prepare(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The conditions of a whole sampling run, checked, with what need not be recomputed at every step done once."""
        self.check(cond)
        return cond


class TextConditionModule(ConditionModule):
    """A caption-conditioned module: previews use its stated prompts, else the captions given, else the empty caption."""

    prompts: tuple[str, ...] = ()
    """Stated preview prompts (empty: none stated)."""

    def preview(self, num: int, captions: Sequence[str] = ()) -> dict[str, Any]:
        prompts = self.prompts or tuple(captions) or ("",)
        return {"txt": [prompts[i % len(prompts)] for i in range(num)]}


class Condition:
    """Base of the condition configs (a plain base class so YAML can pick one by class_path)."""

    def build(self, dim: int) -> ConditionModule:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class ClassLabel(Condition):
    """Class-conditional generation: one learned embedding per class plus a null class."""

    num_classes: int | None = None
    """Number of classes; labels are 0..num_classes-1 (the `cls` field of a sample). None: the training
    shards' classes.json (the CLI reads it before the model is built)."""

    def build(self, dim: int) -> ConditionModule:
        if self.num_classes is None:
            raise ValueError("ClassLabel.num_classes is unset; expected the count of the shards' classes.json (set by "
                             "`duoflow fit`) or model.init_args.conditioning.init_args.num_classes")
        return ClassEmbedder(self.num_classes, dim)


class ClassEmbedder(ConditionModule):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # last row = null class
        nn.init.normal_(self.table.weight, std=0.02)


    def preview(self, num: int, captions: Sequence[str] = ()) -> dict[str, Any]:
        return {"cls": [i % self.num_classes for i in range(num)]}

    def check(self, cond: dict[str, Any]) -> None:
        """Labels within 0..num_classes-1 (num_classes itself would silently be the null class)."""
        if "cls" not in cond:
            return
        labels = torch.as_tensor(cond["cls"]).reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class label {int(bad[0])} outside 0..{self.num_classes - 1} (model.conditioning.num_classes)")

    def forward(self, cond: dict[str, Any], drop: Tensor) -> tuple[Tensor, Tensor]:
        labels = torch.as_tensor(cond["cls"], device=self.table.weight.device).long()  # checked on the host (check)
        labels = torch.where(drop.to(labels.device, non_blocking=True), self.num_classes, labels)
        emb = self.table(labels)  # (B, D)
        return emb[:, None], emb


@dataclass(frozen=True)
class ByteText(Condition):
    """Text conditioning by a small byte-level transformer trained from scratch with the generator.

    Bytes need no vocabulary file and no download; the empty caption is the null condition (SD3)."""

    max_len: int = 64
    """Captions are cut to this many UTF-8 bytes."""
    layers: int = 2
    """Transformer layers of the text encoder."""
    heads: int = 4
    prompts: tuple[str, ...] = ()
    """Captions of the preview samples; empty: the first distinct captions of the training shards
    (callbacks.samples.SamplePreview, and ``sample`` without --prompt when those shards are at hand)."""

    def build(self, dim: int) -> ConditionModule:
        return ByteTextEncoder(dim, self.max_len, self.layers, self.heads, self.prompts)


class ByteTextEncoder(TextConditionModule):
    PAD = 256

    def __init__(self, dim: int, max_len: int, layers: int, heads: int, prompts: tuple[str, ...] = ()):
        super().__init__()
        self.max_len = max_len
        self.prompts = tuple(prompts)
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode_bytes(self, texts: list[str]) -> Tensor:
        """(B, max_len) byte ids, PAD-filled; long captions are truncated."""
        out = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            data = list(text.encode("utf-8")[: self.max_len])
            out[i, : len(data)] = torch.tensor(data, dtype=torch.long)
        return out.to(self.pos.device, non_blocking=True)

    def forward(self, cond: dict[str, Any], drop: Tensor) -> tuple[Tensor, Tensor]:
        ids = self.encode_bytes(list(cond["txt"]))
        ids = torch.where(drop.to(ids.device, non_blocking=True)[:, None], self.PAD, ids)  # dropped: the empty caption
        h = self.norm(self.encoder(self.embed(ids) + self.pos))  # (B, L, D)
        return h, h.mean(1)


@dataclass(frozen=True)
class Unconditional(Condition):
    """No condition: one learned context token (the backbone needs a context stream)."""

    def build(self, dim: int) -> ConditionModule:
        return NullEmbedder(dim)


class NullEmbedder(ConditionModule):
    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)


    def forward(self, cond: dict[str, Any], drop: Tensor) -> tuple[Tensor, Tensor]:
        tok = self.token.expand(drop.shape[0], -1, -1)
        return tok, tok[:, 0]


@dataclass(frozen=True)
class PretrainedText(Condition):
    """Text conditioning by frozen pretrained encoders loaded from local folders (T5, CLIP, any
    AutoModel, sentence-transformers MiniLM; several at once as SD3). Each encoder's token states,
    projected to the model width, form the context (concatenated per caption, each caption at its
    own length); the concatenated pooled vectors feed adaLN. The null condition (CFG) is the empty
    caption's encoding. Embeddings cached by ``duoflow shards encode`` are used as they come (the
    encoders then only encode the empty caption and preview prompts)."""

    encoders: tuple[TextEncoderSpec, ...] = ()
    """The encoders, in the order their pooled vectors are concatenated."""
    prompts: tuple[str, ...] = ()
    """Captions of the preview samples; empty: the training captions (as ByteText)."""

    def build(self, dim: int) -> ConditionModule:
        if not self.encoders:
            raise ValueError("PretrainedText: encoders=[]; expected at least one {path: FOLDER} text encoder")
        return PretrainedTextEncoder(list(self.encoders), dim, self.prompts)


class PretrainedTextEncoder(TextConditionModule):
    def __init__(self, specs: list[TextEncoderSpec], dim: int, prompts: tuple[str, ...] = ()):
        super().__init__()
        self.text = TextEncoders(specs)  # frozen, held: not in state_dict, parameters() or the optimizer
        self.prompts = tuple(prompts)
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in self.text.token_dims)
        self.pooled = nn.Sequential(nn.Linear(self.text.pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @property
    def fingerprints(self) -> list[str]:
        return self.text.fingerprints

    def check(self, cond: dict[str, Any]) -> None:
        """Cached caption embeddings (``txt_tokens``/``txt_pooled`` from encoded shards) as wide as this model's
        encoders give them, in their order: checked once per batch on the host and once per sampling run, not at
        every forward (an ODE runs the model at every step)."""
        if "txt_tokens" not in cond:
            return
        tokens, pooled = cond["txt_tokens"], torch.as_tensor(cond["txt_pooled"])  # host values: only shapes read
        widths = [t.shape[-1] for t in tokens[0]] if len(tokens) else []
        if widths != self.text.token_dims or pooled.shape[-1] != self.text.pooled_dim:
            raise ValueError(f"cached caption embeddings have token widths {widths} and a pooled width "
                             f"{pooled.shape[-1]}; the model's text encoders (model.conditioning) give "
                             f"{self.text.token_dims} and {self.text.pooled_dim}: encode the shards with the same "
                             "--text-encoder list, in the same order")

    def prepare(self, cond: dict[str, Any]) -> dict[str, Any]:
        """Captions encoded once for a sampling run (the ODE calls the model at every step, twice with CFG)."""
        self.check(cond)
        if "txt_tokens" in cond or "txt" not in cond:
            return cond
        tokens, pooled = self.embeddings(cond)
        return {**cond, "txt_tokens": tokens, "txt_pooled": pooled}

    def embeddings(self, cond: dict[str, Any]) -> tuple[list[list[Tensor]], Tensor]:
        """Per caption, each encoder's (L_i, D_i) token states, and the (B, P) pooled vectors: cached
        (``txt_tokens``/``txt_pooled`` from encoded shards, checked by ``check``) or encoded now from ``txt``."""
        if "txt_tokens" in cond:
            return [list(per_caption) for per_caption in cond["txt_tokens"]], torch.as_tensor(cond["txt_pooled"])
        encoded = self.text.encode(list(cond["txt"]))
        per_encoder = [encoded.unpadded(i) for i in range(len(encoded.tokens))]
        return [list(per_caption) for per_caption in zip(*per_encoder)], encoded.pooled

    def forward(self, cond: dict[str, Any], drop: Tensor) -> tuple[Context, Tensor]:
        tokens, pooled = self.embeddings(cond)
        device = self.pooled[0].weight.device
        dropped = drop.tolist()  # a host tensor (see ConditionModule): the caption lengths are decided here
        if any(dropped):
            null = self.text.null()
            null_tokens = [null.unpadded(i)[0] for i in range(len(null.tokens))]
            tokens = [null_tokens if d else t for t, d in zip(tokens, dropped)]
            pooled = torch.where(drop.to(pooled.device, non_blocking=True)[:, None], null.pooled.to(pooled), pooled)
        context = [
            torch.cat([proj(t.to(device, torch.float32)) for proj, t in zip(self.proj, per_caption)])  # (L_b, D)
            for per_caption in tokens
        ]
        return context, self.pooled(pooled.to(device, torch.float32))
