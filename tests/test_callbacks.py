"""Callbacks against the declared module protocol (models.training.RunState) and the tracker."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from callbacks.ema import EMA
from callbacks.guards import NonFiniteGuard
from callbacks.samples import log_media
from callbacks.throughput import Throughput


class Recorder:
    """A logger with W&B's media methods, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def log_image(self, **kw) -> None:
        self.calls.append(("image", kw))

    def log_video(self, **kw) -> None:
        self.calls.append(("video", kw))

    def log_audio(self, **kw) -> None:
        self.calls.append(("audio", kw))


def test_log_media_sends_the_preview_and_a_few_files_per_kind() -> None:
    wavs = [Path(f"s-{i}.wav") for i in range(6)]
    rec = Recorder()
    log_media(rec, [*wavs, Path("s-spectrograms.png")], step=7, sample_rate=8000)
    kinds = [k for k, _ in rec.calls]
    assert kinds == ["image", "audio"]
    audio = rec.calls[1][1]
    assert len(audio["audios"]) == 4 and audio["sample_rate"] == [8000] * 4 and audio["step"] == 7
    rec = Recorder()
    log_media(rec, [Path("a.mp4"), Path("grid.png")], step=1)
    assert [k for k, _ in rec.calls] == ["image", "video"] and rec.calls[1][1]["videos"] == ["a.mp4"]
    log_media(object(), [Path("a.mp4"), Path("grid.png")], step=1)  # a logger without media panels: nothing, no error


@pytest.mark.parametrize("callback", [NonFiniteGuard(), EMA(), Throughput()])
def test_callbacks_refuse_a_module_without_the_run_state_in_one_line(callback: L.Callback) -> None:
    with pytest.raises(TypeError, match=r"needs a duoflow training module \(models.training.RunState"):
        callback.on_train_batch_end(None, L.LightningModule(), None, None, 0)


def test_log_media_captions_the_previews_with_their_prompts() -> None:
    rec = Recorder()
    log_media(rec, [Path("a.wav"), Path("b.wav"), Path("s.png")], step=1, sample_rate=8000, prompts=["one", "two"])
    assert rec.calls[0][1]["caption"] == ["one | two"] and rec.calls[1][1]["caption"] == ["one", "two"]


def test_preview_prompts_are_the_first_distinct_captions_of_the_val_else_train_shards(tmp_path: Path) -> None:
    from datamodules.shards import ShardDataModule
    from datamodules.writers import ShardWriter
    from models.conditioning import ByteText

    for name, captions in (("train", ["b", "a", "b", "", "c", "d"]), ("val", ["v1", "v2"])):
        with ShardWriter(str(tmp_path / name / "s-%06d.tar"), maxcount=3) as writer:
            for i, caption in enumerate(captions):
                writer.write({"__key__": f"{i:04d}", "cls": 0, **({"txt": caption} if caption else {})})
    train = ShardDataModule(str(tmp_path / "train"))
    assert train.preview_captions(3) == ["b", "a", "c"]  # in shard order, across shards, duplicates and empties skipped
    assert train.preview_captions(10) == ["b", "a", "c", "d"]
    assert ShardDataModule(str(tmp_path / "train"), val_shards=str(tmp_path / "val")).preview_captions(4) == ["v1", "v2"]
    cond = ByteText().build(32)
    assert cond.preview(3, ["b", "a"])["txt"] == ["b", "a", "b"]  # no stated prompts: the captions, cycled
    assert ByteText(prompts=("x",)).build(32).preview(2, ["b"])["txt"] == ["x", "x"]  # stated prompts win
    assert cond.preview(2)["txt"] == ["", ""]  # nothing known: the empty caption


def test_sample_without_prompt_takes_the_runs_captions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`sample` on a text model without --prompt uses the captions the training previews used (the run's
    validation, else training, shards from the config in the checkpoint); shards that are gone: the empty
    caption, said in one warning; a class model or stated prompts: nothing read."""
    import yaml

    from app.sample import training_captions
    from datamodules.writers import ShardWriter
    from models.conditioning import ByteText, ClassLabel

    with ShardWriter(str(tmp_path / "train" / "s-%06d.tar"), maxcount=2) as writer:
        for i, caption in enumerate(["a red circle", "a blue square", "a red circle", "a green cross"]):
            writer.write({"__key__": f"{i:04d}", "txt": caption})

    class Model:  # what training_captions reads of a generator
        def __init__(self, cond):
            self.cond = cond

    ckpt = {"duoflow_config": yaml.safe_dump({"data": {"train_shards": str(tmp_path / "train" / "*.tar")}})}
    text = Model(ByteText().build(32))
    assert training_captions(text, ckpt, 2) == ["a red circle", "a blue square"]
    assert text.cond.preview(4, training_captions(text, ckpt, 4))["txt"] == [
        "a red circle", "a blue square", "a green cross", "a red circle"]
    assert training_captions(Model(ByteText(prompts=("x",)).build(32)), ckpt, 2) == []
    assert training_captions(Model(ClassLabel(4).build(32)), ckpt, 2) == []
    gone = {"duoflow_config": yaml.safe_dump({"data": {"train_shards": str(tmp_path / "elsewhere" / "*.tar")}})}
    with caplog.at_level("WARNING", logger="duoflow"):
        assert training_captions(text, gone, 2) == []
    assert "sampling the empty caption; pass --prompt TEXT" in caplog.text
