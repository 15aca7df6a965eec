"""Bad input is skipped, counted and named (shard and key); too much of it stops the run with one
line naming the worst shards; user mistakes are one short error line from `python -m app fit`."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datamodules.shards import ShardDataModule, TooManyBadSamples
from datamodules.transforms import ImageTransform
from tests.conftest import ROOT
from tests.test_data import png_bytes, val_keys, write_raw_tar
from tests.test_reliability_resume import small_config


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_truncated_tar_keeps_earlier_samples_and_the_other_shards(tmp_path: Path, caplog) -> None:
    good = png_bytes(np.full((16, 16, 3), 100, np.uint8))
    whole = write_raw_tar(tmp_path / "a.tar", [(f"a{i}.png", good) for i in range(6)])
    cut = write_raw_tar(tmp_path / "b.tar", [(f"b{i}.png", good) for i in range(6)])
    with tarfile.open(cut) as tar:
        b3 = tar.getmember("b3.png")
    Path(cut).write_bytes(Path(cut).read_bytes()[: b3.offset_data + 20])  # ends inside b3's data (a cut-off copy)
    module = ShardDataModule([cut, whole], val_shards=[cut, whole], batch_size=2, num_workers=0,
                             transform=ImageTransform(size=16), samples_per_epoch=8)
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        keys = val_keys(module)
        train = [k for batch in module.train_dataloader() for k in batch["__key__"]]
    assert keys == ["b0", "b1", "b2", *(f"a{i}" for i in range(6))]
    assert len(train) == 8 and set(train) <= set(keys)  # the run goes on
    assert "skipped unreadable shard data" in caplog.text and "b.tar" in caplog.text


def test_nan_wrong_shape_and_unknown_extension_skipped_and_named(tmp_path: Path, caplog) -> None:
    ok = np.full((16, 16, 3), 0.5, np.float32)
    nan = ok.copy()
    nan[3, 4, 1] = np.nan
    shard = write_raw_tar(tmp_path / "arrays.tar", [
        ("good.npy", npy_bytes(ok)),
        ("nan.npy", npy_bytes(nan)),
        ("flat.npy", npy_bytes(np.zeros(16, np.float32))),
        ("unknown.xyz", b"\x00" * 8),  # an extension off the allow-list: never decoded -> no main field
        ("extra.npy", npy_bytes(ok)), ("extra.weird", b"ignored"),  # unknown field beside a good one: dropped
    ])
    module = ShardDataModule(shard, val_shards=shard, batch_size=1, num_workers=0, max_bad_fraction=1.0,
                             transform=ImageTransform(size=16, image_key="npy"))
    with caplog.at_level(logging.WARNING, logger="duoflow.data"):
        keys = val_keys(module)
    assert keys == ["good", "extra"]
    for key, why in (("nan", "NaN"), ("flat", "shape"), ("unknown", "missing field")):
        line = next(r.getMessage() for r in caplog.records if f"{shard}:{key}" in r.getMessage())
        assert why in line
    assert "3 of 4 bad" in caplog.text


def test_too_many_bad_samples_names_the_worst_shards(tmp_path: Path) -> None:
    good = png_bytes(np.full((16, 16, 3), 100, np.uint8))
    bad = write_raw_tar(tmp_path / "bad.tar", [(f"k{i}.png", b"not a png") for i in range(10)])
    meh = write_raw_tar(tmp_path / "meh.tar", [("m0.png", b"broken"), *((f"m{i}.png", good) for i in range(1, 10))])
    fine = write_raw_tar(tmp_path / "fine.tar", [(f"f{i}.png", good) for i in range(10)])
    module = ShardDataModule([bad, meh, fine], batch_size=2, num_workers=0, transform=ImageTransform(size=16))
    loader = module.train_dataloader()
    with pytest.raises(TooManyBadSamples) as err:
        for _epoch in range(10):  # the check starts after 100 samples
            list(loader)
    message = str(err.value)
    assert "\n" not in message and "max_bad_fraction=0.05" in message and "rank 0, worker 0" in message
    worst = message.split("worst shards: ")[1]
    assert worst.startswith(f"{bad} (") and meh in worst and fine not in worst


DRIVER = """
import contextlib, io, json, sys, traceback
from app.__main__ import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["fit", *args])
        except BaseException:
            rc, _ = 99, traceback.print_exc()
    results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_user_mistakes_are_one_short_line(tmp_path: Path, image_shards: Path) -> None:
    """`python -m app fit` with each mistake: exit 2 and one `error:` naming the field or path, no traceback."""
    config = str(small_config(tmp_path, image_shards, "e", recorder=False))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    no_samples = write_raw_tar(tmp_path / "bad" / "x.tar", [])
    cases = [
        (["--config", config, "--data.train_shards", str(tmp_path / "none-{000..003}.tar")], "none-000.tar"),
        (["--config", config, "--data.train_shards", str(tmp_path / "empty")], "holds no *.tar"),
        (["--config", config, "--data.train_shards", no_samples], "hold no samples"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--config", config, "--data.batch_sizee", "3"], "--data.batch_sizee"),
        (["--config", config, "--data.batch_size", "abc"], "data.batch_size"),
        (["--config", config, "--model.init_args.backbone.dim", "wide"], "backbone.dim"),
        (["--config", config, "--ckpt_path", str(tmp_path / "nothing.ckpt")], "nothing.ckpt"),
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([args for args, _ in cases])], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (args, expected), result in zip(cases, json.loads(proc.stdout.splitlines()[-1]), strict=True):
        stderr = result["stderr"]
        assert result["rc"] == 2, (args, stderr[-2000:])
        assert "Traceback" not in stderr and "usage:" not in stderr, (args, stderr[-2000:])
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in stderr, (args, stderr[-2000:])
        assert len(stderr.split("error:", 1)[1].splitlines()) <= 6, (args, stderr)
