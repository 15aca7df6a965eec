"""W&B online with its server unreachable: training starts within init_timeout and goes on offline under the
run's own id (one line saying how to `wandb sync` later), and a resume keeps that id (app/logger.py)."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import pytest
import yaml

from app.__main__ import main
from tests.test_reliability_resume import small_config


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there, a connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_wandb_server_falls_back_to_offline_and_keeps_the_run_id(
        tmp_path: Path, image_shards: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    online = {"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    for name, value in online.items():
        monkeypatch.setenv(name, value)
    config = small_config(tmp_path, image_shards, "w", recorder=False)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["logger"] = {"class_path": "app.logger.WandbLogger", "init_args": {"init_timeout": 20}}
    config.write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", str(config), "--trainer.deterministic", "false"]
    monkeypatch.setenv("WANDB_MODE", "online")
    with caplog.at_level(logging.WARNING, logger="duoflow.logger"):
        started = time.perf_counter()
        assert main([*args, "--trainer.max_steps", "2"]) == 0
        seconds = time.perf_counter() - started
    run = tmp_path / "runs/w"
    run_id = (run / "wandb_id").read_text().strip()
    lines = [r.getMessage() for r in caplog.records if "W&B server" in r.getMessage()]
    assert len(lines) == 1 and "unreachable" in lines[0] and f"run id {run_id}" in lines[0], caplog.text
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id) and f"`wandb sync {offline[0]}`" in lines[0]
    assert list(offline[0].glob("*.wandb")), "the metrics a later `wandb sync` uploads"
    waited = float(re.search(r"unreachable after ([0-9.]+) s", lines[0]).group(1))
    assert waited < 5  # a refused connection is known at once, not after init_timeout
    print(f"fit of 2 steps with the W&B server unreachable: {seconds:.1f} s, {waited:.2f} s of it waiting for W&B")

    caplog.clear()
    monkeypatch.setenv("WANDB_MODE", "online")  # a new process would see it again (Lightning set it to dryrun)
    with caplog.at_level(logging.WARNING, logger="duoflow.logger"):
        assert main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    assert (run / "wandb_id").read_text().strip() == run_id and f"run id {run_id}" in caplog.text
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    # one run, two sessions to sync (W&B adds "-1" to the folder of a session started in the same second)
    assert len(sessions) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name)
                                      for p in sessions), sessions


@pytest.mark.slow
def test_a_server_that_never_answers_costs_init_timeout_then_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog) -> None:
    """A server that takes the connection and never answers (the probe passes): W&B's own start gives up after
    about init_timeout, and the run goes on offline under its id. Measured with init_timeout=5 on a loaded 2-core
    machine: 8.2 s (this test), 12.5 s standalone of which 8.6 s waiting for W&B."""
    import wandb

    from app.logger import WandbLogger

    wandb.teardown()  # W&B keeps settings per process: forget those of earlier runs in this one (offline)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel completes the handshake; nobody ever reads the request
        for name, value in (("WANDB_MODE", "online"), ("WANDB_API_KEY", "f" * 40),
                            ("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")):
            monkeypatch.setenv(name, value)
        logger = WandbLogger(save_dir=str(tmp_path), id="hangabcd", init_timeout=5)
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="duoflow.logger"):
            run = logger.experiment
        seconds = time.perf_counter() - started
    try:
        assert run.id == "hangabcd" and run.settings.mode in ("offline", "dryrun")
        assert seconds < 60 and "unreachable" in caplog.text and "wandb sync" in caplog.text
        assert list((tmp_path / "wandb").glob("offline-run-*-hangabcd"))
    finally:
        wandb.finish()
