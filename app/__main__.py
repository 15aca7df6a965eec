"""Entry point: `python -m app <command>` and the `duoflow` console script."""

from __future__ import annotations

import logging
import os
import sys

HELP = """usage: duoflow <command> [options]      (same as: python -m app <command>)

Train flow-matching generators (image, video, audio, 3D, audio-video) on one MM-DiT backbone.

training (LightningCLI; every option can be overridden on the command line, see <command> --help):
  fit        train:      duoflow fit --config configs/image/tiny.yaml [--trainer.max_steps N] [--ckpt_path last]
  validate   validation loss of a checkpoint
  test       test loop
  predict    prediction loop

tools:
  sample     generate media from a checkpoint:  duoflow sample --ckpt runs/NAME/checkpoints/last.ckpt --num 16 --out samples/
  export     weights to safetensors (EMA):      duoflow export --ckpt runs/NAME/checkpoints/last.ckpt --out model.safetensors [--no-ema]
  shards     write WebDataset shards:           duoflow shards images|audio|videos|audiovideo|shapes SRC OUT
                                                 duoflow shards synthetic KIND OUT --num N
                                                 duoflow shards encode SRC OUT --autoencoder DIR [--text-encoder DIR]
  datasets   export a bundled real data set:    duoflow datasets digits data/digits-png --size 16
  evaluate   sample-quality metrics (FID, ...): duoflow evaluate --ckpt CKPT --data HELD_OUT_SHARDS [--num 500] [--json OUT]
  slurm      submit a training job to Slurm:    duoflow slurm submit --config CFG --nodes 1 --gpus-per-node 8 [--dry-run]
  doctor     versions, attention backends that really run, GPU, W&B mode

Run `duoflow <command> --help` for the options of a command.
"""

TOOLS = ("sample", "export", "shards", "datasets", "evaluate", "doctor", "slurm")


def quiet_known_noise() -> None:
    """Silence warnings that are expected with our design and only bury the useful output."""
    import warnings

    for pattern in (
        r".*IterableDataset. has .__len__. defined.*",  # our loader's length is exact by construction
        r".*Total length of .* across ranks is zero.*",  # no validation shards configured
        r".*srun. command is available on your system but is not used.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*no pre-optimization state was saved.*",  # manual optimization: checkpoints hold the post-step state, as intended
        r".*Attribute '\w*codec' is an instance of .nn.Module.*",  # codecs save no weights: their hparams rebuild them
        r".*does not have many workers which may be a bottleneck.*",
        r"(?s).*Unable to serialize instance <app.checkpoint_io.AtomicCheckpointIO.*",  # set in code, not config
        r".*overridden .transfer_batch_to_device. in .LightningModule. but have passed in a .LightningDataModule.*",
        # the module's hook checks conditions on the host; the datamodule has none, so Lightning uses it as intended
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning already prints these lines itself


class AboveTheBars(logging.StreamHandler):
    """Log lines printed above any progress bar (tqdm's, Lightning's), never into the bar's own line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", handlers=[AboveTheBars()])
    quiet_known_noise()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # torch's C++ warnings (read before torch loads) print stack dumps, e.g. for each store call after a rank
    # vanished; callbacks/ranks.py says what happened in one line. TORCH_CPP_LOG_LEVEL=WARNING shows them again.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    from app.errors import UserError
    from callbacks.checkpoint import CHECKPOINT_NOT_SAVED_EXIT, CheckpointNotSaved
    from callbacks.guards import TrainingDiverged
    from datamodules.shards import TooManyBadSamples

    try:
        if argv[0] in TOOLS:
            import importlib

            return int(importlib.import_module(f"app.{argv[0]}").main(argv[1:]) or 0)
        from app.cli import run_lightning

        run_lightning(argv)
        return 0
    except (UserError, FileNotFoundError, ValueError, TooManyBadSamples) as e:
        if os.environ.get("DUOFLOW_TRACEBACK"):
            raise
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a dataloader worker: keep the original message only
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        print("(set DUOFLOW_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # checkpoints are written; the run failed, so say so in the exit code
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointNotSaved as e:  # the run's newest steps are not on disk: a failure, said in the exit code
        print(f"error: {e}", file=sys.stderr)
        return CHECKPOINT_NOT_SAVED_EXIT
    except Exception as e:  # a rank vanished mid-step: callbacks/ranks.py has logged the one line naming it
        from callbacks.ranks import RANK_VANISHED_EXIT, vanished_line

        if vanished_line(e) is None or os.environ.get("DUOFLOW_TRACEBACK"):
            raise
        return RANK_VANISHED_EXIT


if __name__ == "__main__":
    sys.exit(main())
