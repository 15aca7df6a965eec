"""`duoflow doctor`: what this machine can run, checked by running it."""

from __future__ import annotations

import argparse
import os
import platform


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="duoflow doctor", description="Versions, attention backends that really run, GPU, W&B mode.").parse_args(argv)
    import lightning
    import torch

    from models.attention import backend_report, resolve_backend

    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__} (CUDA build {torch.version.cuda})")
    print(f"lightning   {lightning.__version__}")
    try:
        import xformers

        print(f"xformers    {xformers.__version__}")
    except Exception as e:  # noqa: BLE001 - report, do not hide
        print(f"xformers    not importable: {e}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"gpu {i}       {torch.cuda.get_device_name(i)}  bf16={torch.cuda.is_bf16_supported()}")
    else:
        print("gpu         none (CPU only)")
    print("attention backends:")
    for name, status in backend_report().items():
        print(f"  {name:10s} {status}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"attention 'auto' on {dev}: {resolve_backend(dev)}")
    print(f"W&B mode    {os.environ.get('WANDB_MODE', 'offline')} (set WANDB_MODE=online and `wandb login` for online runs)")
    return 0
