"""`duoflow slurm submit`: render slurm/train.sbatch for a training run and submit it with sbatch.

    duoflow slurm submit --config configs/image/base.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00 [--dry-run]
    duoflow slurm submit --config configs/image/tiny.yaml --gpus-per-node 0 --tasks-per-node 2 -- --trainer.max_steps 500

Everything after `--` is passed to `fit` unchanged. The job checkpoints and requeues itself before its
time limit (callbacks/preemption.py) and resumes with `--ckpt_path last`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

import yaml

from app.errors import UserError
from datamodules.media.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "train.sbatch"
SIGNAL_SECONDS = 90  # SIGUSR1 this long before the time limit: enough to save a large checkpoint

EPILOG = """\
what the job does:
  srun starts one `python -m app fit` per device (GPU jobs: one task per GPU, --trainer.devices G
  --trainer.num_nodes N; CPU jobs (--gpus-per-node 0): --tasks-per-node processes with DDP over gloo).
  90 s before the time limit Slurm sends SIGUSR1; the Preemption callback saves
  <run>/checkpoints/last.ckpt at the next step, requeues the job and exits; the requeued job resumes
  from it (same W&B run). The rendered script is kept as <run>/train.sbatch: edit it and `sbatch` it by hand.

examples:
  duoflow slurm submit --config configs/image/base.yaml --config configs/trainer/fsdp.yaml \\
      --nodes 2 --gpus-per-node 8 --cpus-per-task 12 --time 48:00:00 --partition gpu --dry-run
  duoflow slurm submit --config configs/image/tiny.yaml --gpus-per-node 0 --tasks-per-node 2 \\
      -- --trainer.max_steps 500 --data.num_workers 0
"""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="duoflow slurm", description="Run training as Slurm batch jobs.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "submit", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        help="render slurm/train.sbatch for a run and submit it",
        description="Render slurm/train.sbatch for a training run and submit it with sbatch. "
                    "Arguments after `--` go to `fit` unchanged.",
        usage="duoflow slurm submit --config CFG [options] [--dry-run] [-- extra fit args]")
    s.add_argument("--config", action="append", required=True,
                   help="fit config (repeat to layer, e.g. a configs/trainer/*.yaml after the model config)")
    s.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one task each (default 0: a CPU job with --tasks-per-node processes)")
    s.add_argument("--tasks-per-node", type=int, default=1,
                   help="processes per node for a CPU job (default 1); ignored with GPUs")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per task (for data-loader workers)")
    s.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--qos", help="Slurm quality of service")
    s.add_argument("--constraint", help="node features, e.g. h100")
    s.add_argument("--max-failures", type=int, default=3,
                   help="requeue the job after a rank vanished (killed, out of memory, node lost) at most this many "
                        "times (default 3); it resumes from the last checkpoint")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, e.g. --sbatch=--mem=0 (repeatable)")
    s.add_argument("--job-name", help="Slurm job name (default: duoflow-<run name>)")
    s.add_argument("--name", help="run name: the run directory is <runs_dir>/<name> (default: the config's `name`)")
    s.add_argument("--runs_dir", "--runs-dir", default="runs", help="parent folder of run directories (default runs)")
    s.add_argument("--python", default=sys.executable, help=f"Python on the compute nodes (default {sys.executable})")
    s.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    args = ap.parse_args(argv)
    return args, extra


def config_value(configs: list[str], *keys: str) -> object:
    """The value at keys (e.g. "trainer", "strategy") in the last config that sets it, else None."""
    for cfg in reversed(configs):
        path = Path(cfg)
        if not path.is_file():
            raise UserError(f"--config {cfg}: no such file")
        data = yaml.safe_load(path.read_text()) or {}
        for key in keys:
            data = data.get(key) if isinstance(data, dict) else None
        if data:
            return data
    return None


def run_name(configs: list[str], name: str | None) -> str:
    """The run name `fit` would pick: --name, else the last config's `name:`, else <folder>-<file stem>."""
    if name:
        return name
    found = config_value(configs, "name")
    if found:
        return str(found)
    path = Path(configs[-1])
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def fit_args(args: argparse.Namespace, name: str, runs_dir: Path, extra: list[str]) -> list[list[str]]:
    """`fit` arguments, one option (with its value) per inner list."""
    for opt in ("--name", "--runs_dir", "--ckpt_path"):
        if any(a == opt or a.startswith(opt + "=") for a in extra):
            raise UserError(f"{opt} after `--`: give --name/--runs_dir to `slurm submit` itself "
                            "(the job always resumes with --ckpt_path last)")
    out = [["--config", c] for c in args.config]
    out += [["--name", name], ["--runs_dir", str(runs_dir)], ["--ckpt_path", "last"]]
    if args.gpus_per_node > 0:
        out += [["--trainer.accelerator", "gpu"], ["--trainer.devices", str(args.gpus_per_node)]]
    else:  # CPU processes talk over gloo, with the configs' strategy (e.g. configs/trainer/ddp.yaml) if they set one
        out += [["--trainer.accelerator", "cpu"], ["--trainer.devices", str(args.tasks_per_node)]]
        if not config_value(args.config, "trainer", "strategy"):
            out.append(["--trainer.strategy", "ddp"])
    out.append(["--trainer.num_nodes", str(args.nodes)])
    if extra:
        out.append(extra)
    return out


def render(args: argparse.Namespace, extra: list[str]) -> tuple[str, Path]:
    """The batch script and the run directory."""
    if args.nodes < 1 or args.gpus_per_node < 0 or args.tasks_per_node < 1 or args.max_failures < 0:
        raise UserError("--nodes and --tasks-per-node must be >= 1, --gpus-per-node and --max-failures >= 0")
    name = run_name(args.config, args.name)
    workdir = Path.cwd().resolve()
    runs_dir = (workdir / args.runs_dir).resolve()
    run_dir = runs_dir / name
    resources = []
    if args.gpus_per_node > 0:
        resources.append(f"--gpus-per-node={args.gpus_per_node}")
    for opt in ("cpus_per_task", "time", "partition", "account", "qos", "constraint"):
        value = getattr(args, opt)
        if value is not None:
            resources.append(f"--{opt.replace('_', '-')}={value}")
    resources += args.sbatch
    tasks = args.gpus_per_node if args.gpus_per_node > 0 else args.tasks_per_node
    lines = [" ".join(shlex.quote(a) for a in group) for group in fit_args(args, name, runs_dir, extra)]
    from callbacks.ranks import RANK_VANISHED_EXIT  # here: it loads Lightning, which --help and errors do not need

    script = Template(TEMPLATE.read_text()).substitute(
        job_name=args.job_name or f"duoflow-{name}",
        nodes=args.nodes,
        tasks_per_node=tasks,
        resource_lines="".join(f"#SBATCH {r}\n" for r in resources),
        run_dir=run_dir,
        signal_seconds=SIGNAL_SECONDS,
        rank_vanished_exit=RANK_VANISHED_EXIT,
        max_failures=args.max_failures,
        workdir=workdir,
        python=shlex.quote(args.python),
        fit_args=" \\\n".join("    " + line for line in lines),
    )
    return script, run_dir


def submit(script: str, run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's folder
    path = run_dir / "train.sbatch"
    atomic_write_text(path, script)
    try:
        # the job gets this environment (sbatch exports it), less the address of a W&B service this shell's
        # process tree started: on the compute nodes it is unreachable, or a stale run id there is "in use"
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a Slurm login node (or see slurm/local-cluster.sh)") from None
    if result.returncode != 0:
        raise UserError(f"sbatch {path} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    args, extra = parse(argv)
    script, run_dir = render(args, extra)
    if args.dry_run:
        print(script, end="")
        return 0
    job = submit(script, run_dir)
    print(f"submitted job {job}")
    print(f"run directory: {run_dir}  (batch script: {run_dir / 'train.sbatch'})")
    print(f"follow it:     tail -f {run_dir}/slurm-{job}.out    (squeue -j {job}; scancel {job} to stop)")
    return 0
