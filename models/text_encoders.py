"""Frozen pretrained text encoders (transformers) from local folders, one or several at once.

Letters: B captions, L_i tokens of encoder i (longest caption, at most max_length), D_i its
width, P_j its pooled width.

Each encoder gives token states (B, L_i, D_i) with the true lengths (B,) from the tokenizer's
attention mask (right padding, never attended to, zeroed in the output), and a pooled vector:

    kind             model class                      token states        pooled
    t5               T5/MT5/UMT5EncoderModel          last_hidden_state   masked mean of the tokens
    clip             CLIPTextModel                    last_hidden_state   pooler_output (EOS token)
    clip_projection  CLIPTextModelWithProjection      last_hidden_state   text_embeds
    auto             AutoModel (Qwen, Gemma, BERT..)  last_hidden_state   masked mean of the tokens
    mean_pooled      AutoModel (sentence-transformers) last_hidden_state  masked mean, L2-normalised
                                                                          when modules.json says Normalize

``layer`` takes the token states from ``hidden_states[layer]`` instead (SD3 uses the CLIPs'
penultimate layer, -2). Several encoders (SD3: two CLIPs and a T5) give one token sequence
each and the concatenation of their pooled vectors. The models are held by ``FrozenModules``:
never trained, never in the generator checkpoint, which stores their ``fingerprints``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.pretrained_files import (
    FrozenModules,
    check_fingerprint,
    folder_fingerprint,
    model_folder,
    no_autocast,
    read_config,
    resolve_path,
    torch_dtype,
)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D), (B, L) -> (B, D): mean over the true tokens (zero for an empty sequence)."""
    weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@dataclass(frozen=True)
class Kind:
    """How one kind of text encoder is loaded and pooled."""

    model_class: str
    """transformers class that loads it (T5 variants: picked by model_type, see T5_CLASSES)."""
    pooled: Callable[[Any, Tensor, Tensor], Tensor]
    """(model output, (B, L, D) zero-padded token states, (B, L) mask) -> (B, P)."""
    clip_projection: bool = False
    """Pooled width is config.projection_dim (else hidden_size)."""


def pooled_tokens(out: Any, tokens: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(tokens, mask)


KINDS: dict[str, Kind] = {
    "t5": Kind("T5EncoderModel", pooled_tokens),
    "clip": Kind("CLIPTextModel", lambda out, tokens, mask: out.pooler_output),
    "clip_projection": Kind("CLIPTextModelWithProjection", lambda out, tokens, mask: out.text_embeds, clip_projection=True),
    "auto": Kind("AutoModel", pooled_tokens),
    "mean_pooled": Kind("AutoModel", pooled_tokens),
}
T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


@dataclass(frozen=True)
class TextEncoderSpec:
    path: str
    """Folder written by save_pretrained (or a pipeline folder, with subfolder)."""
    subfolder: str | None = None
    """Sub-folder of the model (SD3: "text_encoder", "text_encoder_2", "text_encoder_3")."""
    tokenizer_subfolder: str | None = None
    """Sub-folder of the tokenizer (SD3: "tokenizer", ...); None = the model's folder."""
    kind: str | None = None
    """t5, clip, clip_projection, auto or mean_pooled; None = detected from the folder's config.json."""
    max_length: int = 77
    """Longest token sequence kept (longer captions are truncated)."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16. Outputs are float32."""
    layer: int | None = None
    """Token states from hidden_states[layer] (SD3's CLIPs: -2); None = last_hidden_state."""
    fingerprint: str | None = None
    """Expected fingerprint of the folder (a generator checkpoint records it); None = not checked."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"TextEncoderSpec {self.path!r}: kind={self.kind!r}; expected one of {', '.join(KINDS)} or None")
        if self.max_length <= 0:
            raise ValueError(f"TextEncoderSpec {self.path!r}: max_length={self.max_length}; expected a positive token count")
        torch_dtype(self.dtype, f"TextEncoderSpec {self.path!r}")

    @property
    def folder(self) -> Path:
        return model_folder(self.path, self.subfolder)

    @property
    def tokenizer_folder(self) -> Path:
        return model_folder(self.path, self.tokenizer_subfolder or self.subfolder)


def sentence_transformer_modules(folder: Path) -> dict[str, str]:
    """Module type -> sub-path of a sentence-transformers folder (``modules.json``); {} for other folders."""
    file = folder / "modules.json"
    return {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in json.loads(file.read_text())} if file.is_file() else {}


def detect_kind(folder: Path, config: dict) -> str:
    """The kind of a saved text encoder, from its config.json and (sentence-transformers) modules.json."""
    modules = sentence_transformer_modules(folder)
    if "Pooling" in modules:
        pooling = folder / modules["Pooling"] / "config.json"
        if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{str(pooling)!r} asks for a pooling other than mean; expected mean pooling, or kind='auto' to mean-pool anyway")
        return "mean_pooled"
    architectures, model_type = config.get("architectures") or [], config.get("model_type")
    if "CLIPTextModelWithProjection" in architectures or model_type == "clip":
        return "clip_projection"
    if "CLIPTextModel" in architectures or model_type == "clip_text_model":
        return "clip"
    if model_type in T5_CLASSES:
        return "t5"
    return "auto"


def unpadded(tokens: Tensor, lengths: Tensor) -> list[Tensor]:
    """(B, L, D) padded token states + (B,) lengths -> B tensors (L_b, D): how shards store them."""
    return [t[:n] for t, n in zip(tokens, lengths.tolist())]


@dataclass
class EncodedText:
    tokens: list[Tensor]
    """Per encoder: (B, L_i, D_i) float32 token states, zero past each caption's length."""
    lengths: list[Tensor]
    """Per encoder: (B,) int64 true token counts (attention-mask sums), on the host."""
    pooled: Tensor
    """(B, sum P_j): every encoder's pooled vector, concatenated in encoder order."""

    def unpadded(self, i: int = 0) -> list[Tensor]:
        """Encoder i's per-caption (L_b, D_i) token states."""
        return unpadded(self.tokens[i], self.lengths[i])


class TextEncoder:
    """One loaded encoder: its spec, tokenizer, model and detected kind (the model is held by TextEncoders)."""

    def __init__(self, spec: TextEncoderSpec):
        import transformers  # here: configs naming text encoders import this module; only a load needs transformers

        config = read_config(spec.folder, " by transformers (a text encoder)")
        self.spec = spec
        self.kind = spec.kind or detect_kind(spec.folder, config)
        self.normalize_pooled = self.kind == "mean_pooled" and "Normalize" in sentence_transformer_modules(spec.folder)
        found = (check_fingerprint(spec.path, spec.subfolder, spec.fingerprint, spec.tokenizer_subfolder)
                 if spec.fingerprint else None)
        self.fingerprint = found or folder_fingerprint(spec.folder, spec.tokenizer_folder)
        kind = KINDS[self.kind]
        name = T5_CLASSES.get(config.get("model_type"), kind.model_class) if self.kind == "t5" else kind.model_class
        root = resolve_path(spec.path)
        self.model = getattr(transformers, name).from_pretrained(
            root, subfolder=spec.subfolder or "", dtype=torch_dtype(spec.dtype, "TextEncoderSpec"), local_files_only=True,
        )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            root, subfolder=spec.tokenizer_subfolder or spec.subfolder or "", local_files_only=True,
        )
        self.tokenizer.padding_side = "right"  # true tokens first: lengths index them (decoder-only tokenizers pad left)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer in {str(spec.tokenizer_folder)!r} has neither a pad nor an eos token; expected one to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.token_dim = self.model.config.hidden_size
        self.pooled_dim = self.model.config.projection_dim if kind.clip_projection else self.token_dim

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Captions -> (B, L, D) token states and (B, P) pooled on the model's device, (B,) lengths on the
        host (counted from the tokenizer's mask there: splitting by them then reads no device value)."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.spec.max_length, return_tensors="pt",
        )
        lengths = batch["attention_mask"].sum(dim=1)
        ids, mask = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask"))
        with no_autocast(device):
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=self.spec.layer is not None)
        hidden = out.last_hidden_state if self.spec.layer is None else out.hidden_states[self.spec.layer]
        tokens = hidden.float() * mask[..., None]  # (B, L, D), padding zeroed
        pooled = KINDS[self.kind].pooled(out, tokens, mask).float()
        if self.normalize_pooled:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return tokens, lengths, pooled


class TextEncoders(FrozenModules):
    """Frozen pretrained text encoders: captions -> per-encoder token states + concatenated pooled vector.

    Args:
        encoders: One spec per encoder, in the order their pooled vectors are concatenated.
    """

    shared = ("_held", "encoders")  # each TextEncoder holds its model: a copy shares them too

    def __init__(self, encoders: list[TextEncoderSpec]):
        super().__init__()
        if not encoders:
            raise ValueError("TextEncoders: encoders=[]; expected at least one TextEncoderSpec")
        self.encoders = [TextEncoder(spec) for spec in encoders]  # plain list: not submodules
        for encoder in self.encoders:
            self.hold(encoder.model)
        self._null: EncodedText | None = None

    @property
    def token_dims(self) -> list[int]:
        return [e.token_dim for e in self.encoders]

    @property
    def pooled_dim(self) -> int:
        return sum(e.pooled_dim for e in self.encoders)

    @property
    def fingerprints(self) -> list[str]:
        """One ``config-weights-tokenizer`` fingerprint per encoder (for ``check_fingerprint``)."""
        return [e.fingerprint for e in self.encoders]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> EncodedText:
        tokens, lengths, pooled = zip(*(encoder(captions) for encoder in self.encoders))
        return EncodedText(list(tokens), list(lengths), torch.cat(pooled, dim=-1))

    def null(self) -> EncodedText:
        """The empty caption's encoding (B = 1), for classifier-free guidance; encoded once."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def _apply(self, fn: Callable, recurse: bool = True) -> TextEncoders:
        self._null = None  # cached on the old device / dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return ", ".join(f"{e.kind}: {str(e.spec.folder)!r} ({e.fingerprint})" for e in self.encoders)
