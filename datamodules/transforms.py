"""Per-modality steps from a decoded sample to tensors, chosen in YAML by ``class_path``.

A transform receives the output of ``decoders.decode_sample`` and returns a flat dict that
``collate`` can batch: the main tensor under ``"x"`` plus conditioning (``"cls"``, ``"txt"``)
and ``"__key__"``. It raises ``BadSample`` for samples it cannot use; the pipeline skips them.
A new modality is a new ``SampleTransform`` subclass (video, audio, shape latents), never a
branch inside an existing one.

Sizes, multiples and rates the model also needs default to None = "from the model": the
transform ``follow``s the generator's ``MediaSpec`` (``ShardDataModule.setup``, the evaluators),
so a config states them once, in the model. A transform used alone (tests, tools) follows a spec
made of its own arguments, with the documented defaults for the rest.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.decoders import IMAGE_EXTENSIONS, BadSample
from datamodules.media.spec import MediaSpec, TokenAxis, agree, agree_multiple

log = logging.getLogger("duoflow.data")


class SampleTransform:
    """Base: ``__call__(decoded) -> dict``, ``cost(sample)`` in tokens, ``follow(spec)``; helpers for keys, labels, captions."""

    spec: MediaSpec = MediaSpec()
    """The media spec followed last (the model's, or one made of the transform's own arguments)."""

    def __call__(self, decoded: dict) -> dict:
        raise NotImplementedError

    def cost(self, sample: dict) -> int:
        """Tokens the model makes of a transformed sample (the unit of ``ShardDataModule.batch_budget``)."""
        raise NotImplementedError(f"{type(self).__name__}.cost: expected the sample's token count")

    def follow(self, spec: MediaSpec) -> None:
        """Take the generator's media spec: options the config left unset (None) follow it, stated ones are checked."""
        self.spec = spec

    def check_shards(self, urls: list[str]) -> None:
        """Refuse, in one line, shards the followed spec cannot train on (default: any)."""

    def option(self, name: str, stated: int | None, derived: int | None, default: int, multiple: bool = False) -> int:
        """Option ``name``: the stated value, checked against the model's (``derived``, None: the model has none),
        else the model's, else ``default``. ``multiple``: a multiple of the model's value is no contradiction."""
        if derived is None:
            return default if stated is None else stated
        check = agree_multiple if multiple else agree
        return check(f"data.transform.{name}", stated, derived, self.spec.source(name))

    @staticmethod
    def where(decoded: dict) -> str:
        """``"<shard>:<key>"`` for error messages."""
        return f"{decoded.get('__url__', '?')}:{decoded.get('__key__', '?')}"

    def first_present(self, decoded: dict, keys: tuple[str, ...]) -> tuple[str, Any]:
        """The first of ``keys`` present in the sample, or BadSample naming what was expected."""
        for key in keys:
            if key in decoded:
                return key, decoded[key]
        fields = sorted(k for k in decoded if not k.startswith("__"))
        raise BadSample(f"{self.where(decoded)}: missing field, expected one of {list(keys)}, found {fields}")

    def conditioning(self, decoded: dict) -> dict:
        """Class label (-1 when absent), caption ("" when absent) and key."""
        label = decoded.get("cls", -1)
        caption = decoded.get("txt", "")
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            raise BadSample(f"{self.where(decoded)}: cls: expected an int, got {type(label).__name__}")
        if not isinstance(caption, str):
            raise BadSample(f"{self.where(decoded)}: txt: expected a str, got {type(caption).__name__}")
        return {"cls": int(label), "txt": caption, "__key__": decoded.get("__key__", "")}


class ImageTransform(SampleTransform):
    """Image -> ``x`` float32 (3, size, size) in [-1, 1]: resize the shorter side, centre crop.

    With ``keep_aspect`` nothing is cropped: an image keeps its aspect ratio and its resolution up
    to ``size * size`` pixels (larger ones are scaled down to that area), each side rounded to a
    multiple of ``multiple`` (the patch size), so a batch holds images of different shapes and
    token counts (packed by the generator, see models/tokens.py).

    Args:
        size: Output side in pixels (keep_aspect: the side of the square of the largest area kept);
            None: the model's (32 alone).
        random_flip: Flip horizontally with probability 1/2.
        keep_aspect: Keep each image's aspect ratio (no crop) instead of centre-cropping a square.
        multiple: With keep_aspect, round each side to a multiple of this; None: the model's
            (patch x the codec's spatial factor; 1 alone).
        max_aspect: With keep_aspect, wider (or taller) images than this ratio are centre-cropped to
            it (counted in the warning log), so token counts stay bounded.
        image_key: Comma-separated sample fields to look for, first match wins. Fields may hold
            decoded images (uint8 (H, W, 3)) or ``npy`` arrays: uint8, or float in [0, 1];
            (H, W) grey arrays are repeated to 3 channels.
    """

    def __init__(
        self,
        size: int | None = None,
        random_flip: bool = False,
        image_key: str = ",".join(IMAGE_EXTENSIONS),
        keep_aspect: bool = False,
        multiple: int | None = None,
        max_aspect: float = 4.0,
    ):
        if (size is not None and size <= 0) or (multiple is not None and multiple <= 0) or max_aspect < 1:
            raise ValueError(
                f"ImageTransform: need size > 0, multiple > 0, max_aspect >= 1; got {size}, {multiple}, {max_aspect}"
            )
        self.stated = {"size": size, "multiple": multiple}
        self.random_flip = random_flip
        self.image_keys = tuple(k.strip() for k in image_key.split(",") if k.strip())
        self.keep_aspect, self.max_aspect = keep_aspect, max_aspect
        self.follow(MediaSpec(pixels=TokenAxis(patch=multiple or 1)))  # alone: tokens at patch = multiple

    def follow(self, spec: MediaSpec) -> None:
        super().follow(spec)
        self.size = self.option("size", self.stated["size"], spec.size, 32)
        # only keep_aspect rounds to it: without, a stated value is unused (older run configs state 1)
        derived = spec.pixels.multiple if self.keep_aspect else None
        self.multiple = self.option("multiple", self.stated["multiple"], derived, spec.pixels.multiple, multiple=True)

    def cost(self, sample: dict) -> int:
        _, h, w = sample["x"].shape
        return self.spec.image_tokens(h, w)

    def aspect_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): at most about size^2 pixels at the image's aspect ratio (capped at max_aspect), sides multiples of `multiple`."""
        aspect = min(max(width / height, 1 / self.max_aspect), self.max_aspect)
        side = min(self.size, math.sqrt(height * width))  # smaller images keep their resolution
        m = self.multiple
        h = max(m, round(side / math.sqrt(aspect) / m) * m)
        w = max(m, round(side * math.sqrt(aspect) / m) * m)
        return h, w

    def __call__(self, decoded: dict) -> dict:
        field, image = self.first_present(decoded, self.image_keys)
        x = self.to_tensor(image, f"{self.where(decoded)}: {field}")  # (3, H, W) in [-1, 1]
        x = self.resize_aspect(x) if self.keep_aspect else self.resize_crop(x)  # (3, h, w) / (3, size, size)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"x": x.contiguous(), **self.conditioning(decoded)}

    @staticmethod
    def to_tensor(image: Any, where: str) -> torch.Tensor:
        if not isinstance(image, np.ndarray):
            raise BadSample(f"{where}: expected an image array, got {type(image).__name__}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise BadSample(f"{where}: expected an (H, W, 3) image, got shape {image.shape}")
        if image.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1.0
        elif np.issubdtype(image.dtype, np.floating):
            if not np.isfinite(image).all():
                raise BadSample(f"{where}: image holds NaN or inf")
            if image.min() < 0.0 or image.max() > 1.0:
                raise BadSample(f"{where}: float image outside [0, 1]")
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)) * 2.0 - 1.0
        else:
            raise BadSample(f"{where}: expected uint8 or float image, got dtype {image.dtype}")
        return x.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def resize_aspect(self, x: torch.Tensor) -> torch.Tensor:
        """Resize to `aspect_size` (an over-wide image is first centre-cropped to max_aspect)."""
        _, height, width = x.shape
        if width > self.max_aspect * height or height > self.max_aspect * width:
            keep_w = min(width, int(self.max_aspect * height))
            keep_h = min(height, int(self.max_aspect * width))
            top, left = (height - keep_h) // 2, (width - keep_w) // 2
            x = x[:, top : top + keep_h, left : left + keep_w]
            log.warning("image %dx%d wider than max_aspect=%s: centre-cropped to %dx%d",
                        width, height, self.max_aspect, keep_w, keep_h)
            _, height, width = x.shape
        h, w = self.aspect_size(height, width)
        if (h, w) != (height, width):
            x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(-1, 1)
        return x

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width = x.shape
        if (height, width) != (self.size, self.size):
            scale = self.size / min(height, width)
            new_h, new_w = max(self.size, round(height * scale)), max(self.size, round(width * scale))
            x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            x = x[:, top : top + self.size, left : left + self.size].clamp(-1.0, 1.0)
        return x


def collate(samples: list[dict]) -> dict:
    """Batch transform outputs key by key: tensors stacked, ints -> LongTensor, floats -> tensor, rest -> list.

    Tensors of different shapes (mixed image sizes, clip lengths) stay a list; the generator packs them."""
    if not samples:
        raise ValueError("collate: empty batch")
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            same = all(v.shape == first.shape for v in values)
            batch[key] = torch.stack(values) if same else values
        elif isinstance(first, (int, np.integer)) and not isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
