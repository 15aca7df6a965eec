"""LightningCLI for duoflow: `python -m app fit|validate|test|predict --config ...`.

On top of Lightning's CLI this adds the run directory (`<runs_dir>/<name>/`: resolved config,
checkpoints with last.ckpt, samples, W&B files and id), safe resumption (`--ckpt_path last`
continues the run and its W&B run; starting over an existing run is refused instead of
overwriting it), atomic checkpoint writes, and W&B offline by default.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import lightning
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from app.checkpoint_io import AtomicCheckpointIO
from app.errors import UserError
from datamodules.shards import ShardDataModule

log = logging.getLogger("duoflow")

WANDB_ID_FILE = "wandb_id"

MOVED_CLASS_PATHS = {"callbacks.evaluation.Evaluation": "app.evaluation.callback.Evaluation"}
"""Class paths that moved, as older run configs (and checkpoints) name them -> where they live now."""


class DuoflowCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            lightning.LightningModule,  # any generator, or the shape autoencoder
            ShardDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml"},
            auto_configure_optimizers=False,
            trainer_defaults={"plugins": [AtomicCheckpointIO()]},
            parser_kwargs={"default_env": False, "exit_on_error": False},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse errors become one short UserError (what and where), not the full usage text."""
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            noise = ("Given value", "Does not validate against any", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>")
            lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(noise)]
            raise UserError("\n  ".join(ln.strip() for ln in lines[:6])) from e

    def instantiate_classes(self) -> None:
        """A class that refuses its arguments (e.g. a stated value contradicting a derived one) ends in its own
        one-line error, not in jsonargparse's report of every Union subtype it tried."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            root: BaseException = e
            while root.__cause__ is not None:
                root = root.__cause__
            if root is e or not isinstance(root, (ValueError, FileNotFoundError)):
                raise
            raise UserError(str(root)) from e

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name; the run directory is <runs_dir>/<name> (default: the config file's name).")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of run directories.")

    # ---- run directory, resume and W&B id, before anything is built ------------------------

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        name = cfg.get("name") or self.config_stem(cfg) or "run"
        run_dir = Path(cfg.runs_dir) / name
        cfg.name = name
        cfg.trainer.default_root_dir = str(run_dir)
        last = run_dir / "checkpoints" / "last.ckpt"
        resuming = False
        if sub == "fit":
            ckpt = cfg.get("ckpt_path")
            if ckpt is None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
                ckpt = "last"  # a requeued Slurm job continues its run
            if ckpt == "last":
                if last.exists():
                    cfg.ckpt_path = str(last)
                    resuming = True
                else:
                    rank_zero_only(log.warning)("--ckpt_path last: no checkpoint in %s yet, starting fresh", last.parent)
                    cfg.ckpt_path = None
            elif ckpt:
                if not Path(ckpt).is_file():
                    raise UserError(f"--ckpt_path {ckpt}: no such checkpoint file (or pass 'last' to resume {run_dir})")
                resuming = True
            elif last.exists():
                raise UserError(
                    f"run directory {run_dir} already has checkpoints: pass --ckpt_path last to resume it, "
                    f"or --name NEW_NAME to start a new run"
                )
        self.run_dir = run_dir
        self.configure_wandb(cfg, run_dir, name, resuming)

    @staticmethod
    def config_stem(cfg: Namespace) -> str | None:
        configs = cfg.get("config") or []
        if not configs:
            return None
        path = Path(str(configs[-1]))
        return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem

    @staticmethod
    def configure_wandb(cfg: Namespace, run_dir: Path, name: str, resuming: bool) -> None:
        logger = cfg.trainer.get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for lg in loggers:
            if not isinstance(lg, Namespace) or not str(lg.get("class_path", "")).endswith("WandbLogger"):
                continue
            args = lg.init_args
            args.save_dir = str(run_dir)
            if args.get("name") is None:
                args.name = name
            id_file = run_dir / WANDB_ID_FILE
            if resuming and id_file.exists() and not args.get("id"):
                args.id = id_file.read_text().strip()
            elif not args.get("id"):
                args.id = secrets.token_hex(4)  # W&B ids are short [a-z0-9] strings
            if rank_zero_only.rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                id_file.write_text(args.id + "\n")

    # ---- checkpoints always land in the run directory, always with last.ckpt ----------------

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        # absolute, as Lightning makes a dirpath given to ModelCheckpoint: the dirpath is stored in the
        # checkpoint, and a resume whose dirpath differs (e.g. relative vs absolute) writes last-v1.ckpt
        ckpt_dir = os.path.realpath(self.run_dir / "checkpoints")
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is None:
                    cb.dirpath = ckpt_dir
                if not cb.save_last:
                    cb.save_last = True  # keeps "link" if the user chose it
        return trainer

    def before_fit(self) -> None:
        # the resolved config travels inside every checkpoint (and sits in the run directory)
        self.model.duoflow_config = self.parser.dump(self.config, skip_none=False)
        if rank_zero_only.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log.info("run directory: %s", self.run_dir)

    def after_fit(self) -> None:
        # close the W&B run so its files are complete (and a later fit in this process starts its own session)
        if rank_zero_only.rank == 0 and any(type(lg).__name__ == "WandbLogger" for lg in self.trainer.loggers):
            import wandb

            wandb.finish()


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in args (the last one), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def config_from_checkpoint(args: list[str]) -> list[str]:
    """`fit --ckpt_path FILE` without --config: prepend the run's resolved config stored in FILE.

    The run directory is the checkpoint's (`<runs_dir>/<name>/checkpoints/FILE`) unless --name or
    --runs_dir say otherwise; options on the command line still override the stored config."""
    if not args or args[0] != "fit" or any(a in ("-c", "--config") or a.startswith("--config=") for a in args[1:]):
        return args
    ckpt = _option(args, "--ckpt_path")
    if not ckpt or ckpt == "last" or not Path(ckpt).is_file():
        return args  # nothing to read: the parser (or before_instantiate_classes) reports what is missing
    import torch
    import yaml

    text = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("duoflow_config")
    if not text:
        raise UserError(f"--ckpt_path {ckpt}: the checkpoint holds no run config; pass --config as well")
    for old, moved in MOVED_CLASS_PATHS.items():
        text = text.replace(old, moved)
    cfg = yaml.safe_load(text)
    if isinstance(cfg.get("fit"), dict):  # dumped with the subcommand level
        cfg = cfg["fit"]
    for key in ("config", "ckpt_path", "subcommand"):
        cfg.pop(key, None)
    trainer = cfg.get("trainer") or {}
    plugins = trainer.get("plugins")
    if isinstance(plugins, list):  # instances from trainer_defaults (AtomicCheckpointIO) dump as unusable text
        trainer["plugins"] = [p for p in plugins if not str(p).startswith("Unable to serialize")] or None
    path = Path(ckpt).resolve()
    if path.parent.name == "checkpoints":  # <runs_dir>/<name>/checkpoints/FILE: continue that run
        cfg["name"], cfg["runs_dir"] = path.parent.parent.name, str(path.parent.parent.parent)
    return [args[0], "--config", yaml.safe_dump(cfg, sort_keys=False), *args[1:]]


def run_lightning(args: list[str]) -> None:
    import sys

    args = config_from_checkpoint(args)

    argv = sys.argv
    sys.argv = [argv[0], *args]  # LightningCLI reads sys.argv; passing both makes it warn
    try:
        cli = DuoflowCLI()
    finally:
        sys.argv = argv
    from callbacks.guards import NonFiniteGuard, TrainingDiverged

    for cb in getattr(getattr(cli, "trainer", None), "callbacks", []):
        if isinstance(cb, NonFiniteGuard) and cb.tripped:
            raise TrainingDiverged(cb.message)
