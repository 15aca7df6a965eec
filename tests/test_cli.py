"""End to end through the CLI: shards -> fit -> checkpoint -> sample -> resume; every YAML runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.__main__ import main
from datamodules.shardlists import expand_shards, shard_captions
from tests.conftest import ROOT, SMALL, TINY

SMALL = [*SMALL, "--trainer.log_every_n_steps", "1"]


def fit(tmp_path: Path, shards: Path, *extra: str) -> int:
    return main(["fit", "--config", TINY, *SMALL, "--runs_dir", str(tmp_path / "runs"),
                 "--data.train_shards", str(shards / "*.tar"), *extra])


def test_fit_sample_resume(tmp_path: Path, image_shards: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "runs" / "t"
    assert fit(tmp_path, image_shards, "--name", "t", "--trainer.max_steps", "6",
               ) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / "config.yaml").is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert "ema_state_dict" in ckpt and "duoflow_config" in ckpt
    wandb_id = (run / "wandb_id").read_text().strip()
    assert len(wandb_id) >= 6
    assert any((run / "samples").glob("*grid.png"))  # preview written at the end of training

    # starting over an existing run is refused, with one clear line
    assert fit(tmp_path, image_shards, "--name", "t", "--trainer.max_steps", "6") == 2
    assert "--ckpt_path last" in capsys.readouterr().err

    # resume continues the step count and the W&B run
    assert fit(tmp_path, image_shards, "--name", "t", "--trainer.max_steps", "9", "--ckpt_path", "last") == 0
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 9
    assert (run / "wandb_id").read_text().strip() == wandb_id
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # two sessions of one W&B run id
    assert all(wandb_id in p.name for p in (run / "wandb").glob("offline-run-*"))

    # sample from the checkpoint alone
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(last), "--num", "4", "--out", str(out), "--class", "2", "--steps", "3"]) == 0
    pngs = sorted(out.glob("sample-000*.png"))
    assert len(pngs) == 4
    img = np.asarray(Image.open(pngs[0]))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert (out / "sample-grid.png").is_file()


def test_ckpt_path_last_without_checkpoint_starts_fresh(tmp_path: Path, image_shards: Path) -> None:
    assert fit(tmp_path, image_shards, "--name", "fresh", "--trainer.max_steps", "2", "--ckpt_path", "last",
               "--trainer.logger", "false") == 0
    ckpt = torch.load(tmp_path / "runs/fresh/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2


CONFIG_DATA = {"image": "image", "video": "video", "audio": "audio", "audiovideo": "audiovideo", "shape": "shape"}
"""config folder -> synthetic kind its data is (shape flows train on latent shards encoded from it)."""


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                                          if p.parent.name in CONFIG_DATA))
def test_every_config_runs_one_step(config: str, tmp_path: Path, synthetic_shards, request: pytest.FixtureRequest) -> None:
    """Every shipped YAML parses and trains a step (shrunk to CPU size, as torchgeo does)."""
    modality = Path(config).parent.name
    shards = synthetic_shards(CONFIG_DATA[modality])
    shrink = ["--model.init_args.backbone.dim", "32", "--model.init_args.backbone.heads", "2",
              "--model.init_args.backbone.depth_dual", "1", "--model.init_args.backbone.depth_single", "1"]
    if yaml.safe_load((ROOT / config).read_text())["model"]["class_path"].endswith("ShapeAutoencoder"):
        shrink = ["--model.init_args.codec.width", "32", "--model.init_args.codec.heads", "2",
                  "--data.transform.init_args.points", "64", "--data.transform.init_args.queries", "64"]
    elif modality == "shape":  # a flow on latent shards, decoded by the autoencoder that encoded them
        ckpt, shards = request.getfixturevalue("shape_latents")
        shrink += ["--model.init_args.codec.init_args.ckpt", str(ckpt), "--model.init_args.codec.init_args.resolution", "8"]
    model = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    frames = ["--model.init_args.seconds", "null", "--model.init_args.tokenizer.frames"]  # latent frames, not seconds
    latent_sizes = {"image": ["--model.init_args.tokenizer.size", "8"],
                    "video": ["--model.init_args.tokenizer.size", "4", *frames, "2"],
                    "audio": [*frames, "16"],
                    "audiovideo": ["--model.init_args.tokenizer.size", "4", *frames, "2",
                                   "--model.init_args.fps", "8", "--model.init_args.audio_tokenizer.patch", "8"]}
    if str(model.get("codec", {}).get("class_path", "")).endswith("PretrainedAutoencoder"):  # cached latents, tiny models
        pipeline, shards = request.getfixturevalue("latent_shards")(modality)
        t5 = str(request.getfixturevalue("pretrained")["t5"])
        shrink += ["--model.init_args.codec.init_args.path", str(pipeline), "--model.init_args.codec.init_args.dtype",
                   "float32", "--model.init_args.codec.init_args.stats", str(shards / "latent-stats.json"),
                   "--model.init_args.conditioning.init_args.encoders", json.dumps([{"path": t5, "max_length": 16}]),
                   *latent_sizes[modality]]
        if "audio_codec" in model:
            shrink += ["--model.init_args.audio_codec.init_args.path", str(pipeline / "sound"),
                       "--model.init_args.audio_codec.init_args.stats", str(shards / "audio-latent-stats.json")]
    args = ["fit", "--config", str(ROOT / config), "--runs_dir", str(tmp_path / "runs"), "--trainer.fast_dev_run", "1",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.logger", "false", "--data.batch_size", "2", "--data.num_workers", "0",
            "--data.train_shards", str(shards / "*.tar"), *shrink]
    if modality in ("image", "video", "audiovideo") and "codec" not in model:
        args += ["--model.init_args.tokenizer.size", "16"]  # the data transform follows the model
    assert main(args) == 0
    if Path(config).stem == "tiny-text":  # previews prompted with the training captions, written beside them
        (prompts,) = (tmp_path / "runs").rglob("*-prompts.txt")
        callbacks = yaml.safe_load((ROOT / config).read_text())["trainer"]["callbacks"]
        num = next(c for c in callbacks if c["class_path"].endswith("SamplePreview"))["init_args"]["num"]
        assert prompts.read_text().splitlines() == shard_captions(expand_shards(str(shards / "*.tar")), num)
        assert len(set(prompts.read_text().splitlines())) > 1


def test_help_and_bad_input_are_one_line_errors(tmp_path: Path) -> None:
    env_py = [sys.executable, "-m", "app"]
    top = subprocess.run(env_py + ["--help"], capture_output=True, text=True, cwd=ROOT)
    assert top.returncode == 0 and "sample" in top.stdout and "shards" in top.stdout
    bad = subprocess.run(env_py + ["fit", "--config", TINY, "--runs_dir", str(tmp_path), "--data.train_shards",
                                   str(tmp_path / "nothing-*.tar"), "--trainer.logger", "false"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert "nothing-*.tar" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(env_py + ["sample", "--ckpt", str(tmp_path / "no.ckpt")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no such checkpoint" in missing.stderr and "Traceback" not in missing.stderr


def test_doctor_reports_backends(capsys: pytest.CaptureFixture) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "sdpa" in out and "xformers" in out and "attention 'auto' on" in out


def test_print_config_shows_resolved_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--print_config", "--model.init_args.backbone.dim", "96"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "dim: 96" in out and "models.generators.ImageFlow" in out and "train_shards" in out


def test_resume_from_checkpoint_alone_keeps_writing_last_ckpt(tmp_path: Path, image_shards: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run started with a RELATIVE runs_dir, resumed from its checkpoint file alone (which resolves the
    run directory to an absolute path), must go on writing last.ckpt, not a stray last-v1.ckpt that a later
    `--ckpt_path last` would skip (resuming from the stale last.ckpt and losing the steps in between)."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", TINY, *SMALL, "--runs_dir", "runs", "--name", "rel", "--trainer.max_steps", "4",
                 "--trainer.logger", "false", "--data.train_shards", str(image_shards / "*.tar")]) == 0
    ckpts = tmp_path / "runs/rel/checkpoints"
    assert main(["fit", "--ckpt_path", str(ckpts / "last.ckpt"), "--trainer.max_steps", "7"]) == 0
    assert not list(ckpts.glob("last-v*.ckpt"))
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 7


def test_checkpoint_state_saved_with_a_relative_dirpath_still_restores(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints written before dirpaths were made absolute stored them relative: same folder, same run."""
    from callbacks.checkpoint import RunCheckpoint

    monkeypatch.chdir(tmp_path)
    cb = RunCheckpoint(dirpath=str(tmp_path / "runs/r/checkpoints"))
    state = cb.state_dict()
    state.update(dirpath="runs/r/checkpoints", last_model_path="runs/r/checkpoints/last.ckpt",
                 best_k_models={"runs/r/checkpoints/step00000004.ckpt": 4})
    cb.load_state_dict(state)
    # restored under this run's (absolute) names: Lightning then keeps writing last.ckpt and rotating step files
    assert cb.last_model_path == str(tmp_path / "runs/r/checkpoints/last.ckpt")
    assert list(cb.best_k_models) == [str(tmp_path / "runs/r/checkpoints/step00000004.ckpt")]


def test_a_diverged_run_exits_3_after_saving_the_last_good_state(tmp_path: Path, image_shards: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """NonFiniteGuard stops the run cleanly, and the process says it failed (a scheduler must not take
    it for a finished run)."""
    code = fit(tmp_path, image_shards, "--name", "nan", "--trainer.max_steps", "100",
               "--model.class_path", "tests.test_reliability_numerics.FaultyFlow", "--model.init_args.nan_from", "2")
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stopping: 20 non-finite losses/gradients in a row at step 2"), err[-3:]
    good = torch.load(tmp_path / "runs/nan/checkpoints/last-good.ckpt", map_location="cpu", weights_only=False)
    assert good["global_step"] == 2


def test_configs_follow_the_shards_classes_and_conditioning(tmp_path: Path, image_shards: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The class count comes from the shards' classes.json (a stated one wins); shards that cannot condition the
    model (no class labels for a class model, no captions for a text model) and a pattern matching nothing stop
    in one line before a run directory exists."""
    runs = tmp_path / "runs"
    assert fit(tmp_path, image_shards, "--name", "c", "--trainer.max_steps", "1", "--trainer.logger", "false") == 0
    ckpt = torch.load(runs / "c/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["conditioning"]["init_args"]["num_classes"] == 4  # classes.json: 4 shapes
    assert fit(tmp_path, image_shards, "--name", "s", "--trainer.max_steps", "1", "--trainer.logger", "false",
               "--model.init_args.conditioning.init_args.num_classes", "7") == 0
    ckpt = torch.load(runs / "s/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["conditioning"]["init_args"]["num_classes"] == 7  # stated: wins
    capsys.readouterr()
    captions_only, labels_only = tmp_path / "captions", tmp_path / "labels"
    from datamodules.writers import ShardWriter

    for folder, field in ((captions_only, {"txt": "a picture"}), (labels_only, {"cls": 1})):
        with ShardWriter(str(folder / "s-%06d.tar")) as w:
            for i in range(4):
                w.write({"__key__": f"k{i}", "png": np.zeros((16, 16, 3), np.uint8), **field})
    text = ["--model.init_args.conditioning", "models.conditioning.ByteText"]
    cases = [
        (["--data.train_shards", str(captions_only / "*.tar")], "hold captions, a class model needs class labels"),
        (["--data.train_shards", str(labels_only / "*.tar"), *text], "hold class labels, a text model needs captions"),
        (["--data.train_shards", str(tmp_path / "nothing-*.tar")], "no shard matches"),
    ]
    for extra, expected in cases:
        name = f"bad{len(list(runs.glob('bad*')))}"
        assert main(["fit", "--config", TINY, *SMALL, "--runs_dir", str(runs), "--name", name, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and not (runs / name).exists(), err


def test_log_lines_go_above_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning during a progress bar is written through tqdm.write (above the bar), not into its line."""
    import logging

    import tqdm

    from app.__main__ import AboveTheBars

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, text, file=None: written.append(text)))
    handler = AboveTheBars()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.emit(logging.LogRecord("duoflow.data", logging.WARNING, __file__, 1, "skipped bad sample %s", ("k",), None))
    assert written == ["WARNING duoflow.data: skipped bad sample k"]
