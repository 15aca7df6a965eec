"""ShardDataModule inside a real Lightning fit loop (CPU, tiny)."""

from __future__ import annotations

import lightning
import pytest
import torch

from datamodules.shards import ShardDataModule
from datamodules.synthetic import write_synthetic


class TinyModule(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_keys += batch["__key__"]
        return self.layer(batch["x"].mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["__key__"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("with_val", [False, True])
def test_fit_runs_exact_steps(tmp_path, with_val):
    write_synthetic("image", str(tmp_path / "data"), num=40, shard_size=16, progress=False)
    data = str(tmp_path / "data")
    module = TinyModule()
    datamodule = ShardDataModule(data, val_shards=data if with_val else None, batch_size=8, num_workers=0)
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 * (40 // 8)
    assert len(module.train_keys) == 2 * 40
    assert sorted(module.val_keys) == (sorted(2 * [f"{i:08d}" for i in range(40)]) if with_val else [])
