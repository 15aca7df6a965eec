"""LightningCLI for duoflow: `python -m app fit|validate|test|predict --config ...`.

On top of Lightning's CLI this adds the run directory (`<runs_dir>/<name>/`: resolved config,
checkpoints with last.ckpt, samples, W&B files and id), safe resumption (`--ckpt_path last`
continues the run and its W&B run; starting over an existing run is refused instead of
overwriting it), atomic checkpoint writes, and W&B offline by default.
"""

from __future__ import annotations

import json
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
from callbacks.ranks import RankWatch
from datamodules.media.files import atomic_write_text
from datamodules.shards import ShardDataModule, expand_shards, shard_conditions
from models.checkpoints import reading_as_data

log = logging.getLogger("duoflow")

WANDB_ID_FILE = "wandb_id"

MOVED_CLASS_PATHS = {"callbacks.evaluation.Evaluation": "app.evaluation.callback.Evaluation"}
"""Class paths that moved, as older run configs (and checkpoints) name them -> where they live now."""


def new_run_id() -> str:
    """A W&B run id: 8 characters of [a-z0-9] starting with a letter, so no YAML or JSON reader can take
    it for a number (ids such as 06e88891 or 12345678 from plain hex are read back as inf or an int)."""
    return secrets.choice("abcdefghijklmnopqrstuvwxyz") + secrets.token_hex(4)[1:]


CLASS_CONDITIONS = ("models.conditioning.ClassLabel",)
TEXT_CONDITIONS = ("models.conditioning.ByteText", "models.conditioning.PretrainedText")
CONDITION_KEY = "model.init_args.conditioning"


def follow_the_shards(cfg: Namespace) -> None:
    """The model's conditioning against what the training shards offer: the class count from their
    classes.json when the config leaves it out (a stated one wins), and one line when the shards cannot
    condition the model (captions for a class model, class labels for a text model)."""
    data, cond = cfg.get("data") or Namespace(), (cfg.get("model") or Namespace()).get("init_args")
    cond = cond.get("conditioning") if isinstance(cond, Namespace) else None
    if not data.get("train_shards") or not isinstance(cond, Namespace):
        return
    urls = expand_shards(data.train_shards)  # a pattern matching nothing: one line, here
    offer = shard_conditions(urls)
    kind, where = str(cond.get("class_path", "")), Path(urls[0]).parent
    if not offer:
        return
    if offer.get("empty"):
        raise UserError(f"train shards {data.train_shards!r} hold no samples ({urls[0]} is empty)")
    holds = " and ".join(n for n, k in (("class labels", "labels"), ("captions", "captions")) if offer[k]) or "neither class labels nor captions"
    if kind in CLASS_CONDITIONS:
        args = cond.get("init_args") or Namespace()
        if not offer["labels"]:
            raise UserError(f"{where}: the shards hold {holds}, a class model needs class labels (cls); condition on "
                            f"captions ({CONDITION_KEY}: models.conditioning.ByteText or PretrainedText)")
        if args.get("num_classes") is None:
            if offer["classes"] is None:
                raise UserError(f"{where}: no classes.json beside the shards; set {CONDITION_KEY}.init_args.num_classes")
            args.num_classes = len(offer["classes"])
            cond.init_args = args
    elif kind in TEXT_CONDITIONS and not offer["captions"]:
        raise UserError(f"{where}: the shards hold {holds}, a text model needs captions (txt); condition on the "
                        f"classes ({CONDITION_KEY}: models.conditioning.ClassLabel)")


class DuoflowCLI(LightningCLI):
    run_id: str | None = None
    """The W&B run id of this run (stored in checkpoints beside the config, as a plain string); None without W&B."""

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

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the model's hyper-parameters from --ckpt_path (weights_only=True): with duoflow's
        config types allowed, and a refused checkpoint as one line."""
        ckpt = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        with reading_as_data(ckpt or "--ckpt_path"):
            super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name; the run directory is <runs_dir>/<name> (default: the config file's name).")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of run directories.")
        parser.add_argument("--run_id", type=str | None, default=None,
                            help="W&B run id (default: the run directory's when resuming, else a new one). Given here, "
                                 "not as the logger's id, a value such as 06e88891 stays a string.")

    # ---- run directory, resume and W&B id, before anything is built ------------------------

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        if sub == "fit":
            follow_the_shards(cfg)  # before anything is created: a bad shard pattern leaves no run directory
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
        self.run_id = self.configure_wandb(cfg, run_dir, name, resuming, cfg.get("run_id"))

    @staticmethod
    def config_stem(cfg: Namespace) -> str | None:
        configs = cfg.get("config") or []
        if not configs:
            return None
        path = Path(str(configs[-1]))
        return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem

    @staticmethod
    def configure_wandb(cfg: Namespace, run_dir: Path, name: str, resuming: bool, run_id: str | None = None) -> str | None:
        """Point the W&B logger at the run directory and give it its id; returns the id (None without W&B)."""
        chosen = None
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
            # set after parsing, so no YAML reader sees it: jsonargparse reads a logger id such as 06e88891 as inf
            if run_id:
                args.id = run_id
            elif resuming and id_file.exists():  # the run's own id, whatever a stored config says
                args.id = id_file.read_text().strip()
            elif not args.get("id"):
                args.id = new_run_id()
            chosen = args.id
            if rank_zero_only.rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(id_file, args.id + "\n")  # a crash mid-write must not lose the W&B run id
        return chosen

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
        if trainer.world_size > 1 and not any(isinstance(cb, RankWatch) for cb in trainer.callbacks):
            trainer.callbacks.append(RankWatch())  # a vanished rank is named in one line, survivors exit
        return trainer

    def before_fit(self) -> None:
        # the resolved config travels inside every checkpoint (and sits in the run directory)
        self.model.duoflow_config = self.parser.dump(self.config, skip_none=False)
        self.model.duoflow_run_id = self.run_id
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
    import yaml

    from models.checkpoints import load_checkpoint

    state = load_checkpoint(ckpt, mmap=True)
    text = state.get("duoflow_config")
    if not text:
        raise UserError(f"--ckpt_path {ckpt}: the checkpoint holds no run config; pass --config as well")
    for old, moved in MOVED_CLASS_PATHS.items():
        text = text.replace(old, moved)
    cfg = yaml.safe_load(text)
    if isinstance(cfg.get("fit"), dict):  # dumped with the subcommand level
        cfg = cfg["fit"]
    for key in ("config", "ckpt_path", "subcommand"):
        cfg.pop(key, None)
    logger = (cfg.get("trainer") or {}).get("logger")
    for lg in logger if isinstance(logger, list) else [logger]:
        init = lg.get("init_args") if isinstance(lg, dict) else None
        if isinstance(init, dict) and str(lg.get("class_path", "")).endswith("WandbLogger"):
            init.pop("id", None)  # the stored config may hold it mangled (06e88891 dumped as .inf): the plain copy wins
    if state.get("duoflow_run_id"):
        cfg["run_id"] = str(state["duoflow_run_id"])
    trainer = cfg.get("trainer") or {}
    plugins = trainer.get("plugins")
    if isinstance(plugins, list):  # instances from trainer_defaults (AtomicCheckpointIO) dump as unusable text
        trainer["plugins"] = [p for p in plugins if not str(p).startswith("Unable to serialize")] or None
    path = Path(ckpt).resolve()
    if path.parent.name == "checkpoints":  # <runs_dir>/<name>/checkpoints/FILE: continue that run
        cfg["name"], cfg["runs_dir"] = path.parent.parent.name, str(path.parent.parent.parent)
    # JSON, not YAML: every string stays quoted, so a value such as the W&B id "06e88891" is not read back
    # as a number (PyYAML writes it bare, and jsonargparse's YAML reads 06e88891 as a float)
    return [args[0], "--config", json.dumps(cfg), *args[1:]]


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
