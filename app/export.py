"""`duoflow export`: a checkpoint's weights (EMA by default) as one safetensors file for inference.

The file holds the generator's state dict (float tensors as trained) and, as safetensors metadata,
the model config (`duoflow_model`: JSON with class_path and init_args, as in the run's YAML), which
weights were written (`duoflow_weights`: "ema" or "raw") and the training step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from app.errors import UserError
from app.sample import load_generator, read_checkpoint, run_config
from datamodules.media.files import atomic_write


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow export", description="Export a checkpoint's weights to safetensors.")
    ap.add_argument("--ckpt", required=True, help="checkpoint file, e.g. runs/image-tiny/checkpoints/last.ckpt")
    ap.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    return ap.parse_args(argv)


def model_config(ckpt: dict) -> dict:
    """The `model:` section of the run config stored in the checkpoint (class_path + init_args)."""
    model = run_config(ckpt).get("model") or {}
    if not model.get("class_path"):
        model = {"class_path": ckpt.get("hyper_parameters", {}).get("_class_path"), **model}
    return model


def export(ckpt_path: str | Path, out: str | Path, ema: bool = True) -> Path:
    ckpt = read_checkpoint(ckpt_path)
    model, used_ema = load_generator(ckpt_path, "cpu", ema=ema, ckpt=ckpt)
    if ema and not used_ema:
        raise UserError(f"--ckpt {ckpt_path}: holds no EMA weights; pass --no-ema to export the raw weights")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "duoflow_model": json.dumps(model_config(ckpt)),
        "duoflow_weights": "ema" if used_ema else "raw",
        "duoflow_step": str(ckpt.get("global_step", "")),
    }
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_exported(path: str | Path):
    """Rebuild the generator from an exported file alone: its config from the metadata, then its weights."""
    from jsonargparse import ArgumentParser
    from safetensors import safe_open

    from models.generators import FlowMatchingModule

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "duoflow_model" not in metadata:
        raise UserError(f"{path}: not a duoflow export (no duoflow_model metadata)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=FlowMatchingModule)
    model = parser.instantiate_classes(parser.parse_object({"model": json.loads(metadata["duoflow_model"])})).model
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def main(argv: list[str]) -> int:
    args = parse(argv)
    out = export(args.ckpt, args.out, ema=not args.no_ema)
    print(f"wrote {out} ({'raw' if args.no_ema else 'EMA'} weights)")
    return 0
