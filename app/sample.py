"""`duoflow sample`: generate media from a checkpoint alone (EMA weights when present)."""

from __future__ import annotations

import argparse
import importlib
import logging
import tarfile
from pathlib import Path
from typing import Any

import torch
import yaml

from app.errors import UserError

log = logging.getLogger("duoflow")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow sample", description="Generate samples from a checkpoint (EMA weights by default).")
    ap.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/image-tiny/checkpoints/last.ckpt")
    ap.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    ap.add_argument("--out", default="samples", help="output folder (default samples/)")
    cond = ap.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="cls", type=int, default=None, help="class id for every sample (class-conditional models)")
    cond.add_argument("--prompt", default=None, help="caption for every sample (text-conditional models; default: the "
                      "config's prompts, else the first distinct captions of the run's shards, as its previews)")
    ap.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="ODE steps (default: the model's sampler)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    ap.add_argument("--prefix", default="sample", help="file name prefix")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None,
                        help="video: frames per clip (default: the length the model trained to sample; the backbone is "
                             "length-agnostic)")
    length.add_argument("--seconds", type=float, default=None, help="video or audio: duration of each sample in seconds")
    return ap.parse_args(argv)


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """The checkpoint given as --ckpt, read as data (memory-mapped); one line when there is no such file."""
    from models.checkpoints import load_checkpoint

    if not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt {ckpt_path}: no such checkpoint file")
    return load_checkpoint(ckpt_path, mmap=True)


def run_config(ckpt: dict) -> dict:
    """The run config stored in the checkpoint (``duoflow_config``, YAML), without the subcommand level; {} if none."""
    text = ckpt.get("duoflow_config")
    cfg = yaml.safe_load(text) if text else {}
    return cfg.get("fit", cfg) if isinstance(cfg, dict) else {}


def load_generator(ckpt_path: str | Path, device: str = "cpu", ema: bool = True, ckpt: dict | None = None):
    """Rebuild the generator from its checkpoint (the config travels in it) and load EMA weights.

    `ckpt`: the checkpoint already read from `ckpt_path`, when the caller has it (saves a read)."""
    from callbacks.ema import load_ema_weights
    from models.checkpoints import reading_as_data
    from models.generators import FlowMatchingModule

    path = Path(ckpt_path)
    if ckpt is None:
        ckpt = read_checkpoint(path)
    class_path = ckpt.get("hyper_parameters", {}).get("_class_path")
    if not class_path:
        raise UserError(f"--ckpt {path}: not a duoflow generator checkpoint (no model class recorded in it)")
    module_name, _, class_name = class_path.rpartition(".")
    klass = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(klass, type) and issubclass(klass, FlowMatchingModule)):
        raise UserError(f"--ckpt {path}: model class {class_path} is not a duoflow generator")
    # load through the concrete class: Lightning drops `_class_path` when the base class has no **kwargs
    with reading_as_data(path):
        model = klass.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    used_ema = load_ema_weights(model, ckpt) if ema else False
    return model.to(device).eval(), used_ema


def latent_shapes(model, frames: int | None, seconds: float | None) -> list[tuple[int, ...]] | None:
    """Each stream's latent shape for clips of ``frames`` frames or ``seconds`` seconds (None: the trained
    default), rounded down to what tokenizes whole (a causal video codec: 1 + 4m frames), by the rule of the
    model's own ``seconds`` (models.generators.whole_latent)."""
    from models.generators import whole_latent
    from models.tokenizers.audio import AudioFrames
    from models.tokenizers.video import VideoPatches

    if frames is None and seconds is None:
        return None
    spec, shapes = model.media_spec(), [tok.latent_shape() for tok in model.tokenizers]
    video = [i for i, tok in enumerate(model.tokenizers) if isinstance(tok, VideoPatches)]
    audio = [i for i, tok in enumerate(model.tokenizers) if isinstance(tok, AudioFrames)]
    if not video and (frames is not None or not audio):
        raise UserError(f"--{'frames' if frames is not None else 'seconds'}: {type(model).__name__} makes no "
                        f"{'video' if frames is not None else 'video or audio'}")
    try:
        if video:
            asked = f"--frames {frames}" if frames is not None else f"--seconds {seconds}"
            latent = whole_latent(frames if frames is not None else round(seconds * spec.fps), spec.time, asked, "frames")
            i = video[0]
            shapes[i] = (shapes[i][0], latent, *shapes[i][2:])
            seconds = spec.time.span(latent) / spec.fps  # the soundtrack lasts as long as the frames kept
        for i in audio:
            latent = whole_latent(round(seconds * spec.sample_rate), spec.samples, f"--seconds {seconds}", "samples")
            shapes[i] = (shapes[i][0], latent)
    except ValueError as exn:
        raise UserError(str(exn)) from None
    return shapes


def training_captions(model: Any, ckpt: dict, num: int) -> list[str]:
    """For a text model whose config states no prompts: the first ``num`` distinct captions of the run's validation
    (else training) shards, as the training previews used; none when the model needs none or the shards are not here."""
    from datamodules.shardlists import preview_captions
    from models.conditioning import TextConditionModule

    if not isinstance(model.cond, TextConditionModule) or model.cond.prompts:
        return []
    data = run_config(ckpt).get("data") or {}
    shards = data.get("val_shards") or data.get("train_shards")
    try:
        captions = preview_captions(data.get("val_shards"), data.get("train_shards"), num) if shards else []
    except (OSError, ValueError, tarfile.TarError):  # the run's shards are on another machine, or gone
        captions = []
    if captions:
        log.info("no --prompt: the first %d distinct captions of %s: %s", len(captions), shards, "; ".join(captions))
    else:
        log.warning("no --prompt, and no captions found in the run's shards (%s): sampling the empty caption; "
                    "pass --prompt TEXT", shards)
    return captions


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.num < 1:
        raise UserError(f"--num {args.num}: expected a positive number of samples")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = read_checkpoint(args.ckpt)
    model, used_ema = load_generator(args.ckpt, device, ema=not args.no_ema, ckpt=ckpt)
    classes = model.cond.num_classes
    if args.cls is not None:
        if classes is None:
            raise UserError(f"--class: {args.ckpt} is not a class model ({type(model.cond).__name__}); "
                            "use --prompt TEXT for a text model, or neither")
        if not 0 <= args.cls < classes:
            raise UserError(f"--class {args.cls}: the model has classes 0..{classes - 1}")
        cond = {"cls": [args.cls] * args.num}
    elif args.prompt is not None:
        if classes is not None:
            raise UserError(f"--prompt: {args.ckpt} is a class model ({classes} classes); use --class K")
        cond = {"txt": [args.prompt] * args.num}
    else:
        cond = model.cond.preview(args.num, training_captions(model, ckpt, args.num))
    shapes = latent_shapes(model, args.frames, args.seconds)
    x = model.generate(cond, args.num, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, progress=True,
                       shapes=shapes)
    paths = model.save_media(x, args.out, prefix=args.prefix)
    print(f"wrote {len(paths)} files to {args.out} ({'EMA' if used_ema else 'raw'} weights); preview: {paths[-1]}")
    return 0
