"""callbacks/sharded.py on a real FSDP model: 2 gloo ranks on the CPU, FULL_SHARD, each transformer block
one FSDP unit, as configs/trainer/fsdp.yaml builds it (Lightning's FSDPStrategy itself needs CUDA).

Per-parameter state kept as shards gathers into the unwrapped model's names and shapes and shards back
exactly; sampling outside the training step runs on every rank and equals the unwrapped model's; the EMA
checkpoint and the previews work on such a model (before, the EMA saved rank 0's shards under wrapped
names, and a preview on rank 0 alone would wait forever for the other ranks' collectives)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.backbone import MMDiTConfig
from models.conditioning import ClassLabel
from models.generators import ImageFlow
from models.tokenizers.image import ImagePatches


def tiny() -> ImageFlow:
    torch.manual_seed(0)
    model = ImageFlow(tokenizer=ImagePatches(3, 8, 2), conditioning=ClassLabel(3),
                      backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1))
    with torch.no_grad():  # adaLN-Zero starts at the identity: give every weight a value so sampling depends on it
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def doubled(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A per-parameter state that differs from the weights (as an EMA does)."""
    return {n: 2 * p.detach() + 1 for n, p in named.items()}


def rank_main(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from callbacks.sharded import gather_full, runnable, shard_full
    from models.blocks import DualStreamBlock, SingleStreamBlock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny()
    root = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({DualStreamBlock, SingleStreamBlock}))
    shards = doubled(dict(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = gather_full(root, model, shards)
    again = shard_full(root, model, full)
    untouched = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    sharded = sum(p.numel() for p in before.values()) < sum(p.numel() for p in full.values())
    with runnable(SimpleNamespace(strategy=SimpleNamespace(model=root))):
        x = model.generate(model.cond.preview(2), 2, steps=3, cfg_scale=1.0, seed=0)

    # the EMA and preview callbacks as a Trainer calls them (every rank saves, loads and previews)
    from callbacks.ema import CKPT_KEY, EMA
    from callbacks.samples import SamplePreview

    ema, preview = EMA(decay=0.5), SamplePreview(every_n_steps=1, num=2, steps=3, cfg_scale=1.0)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), is_global_zero=rank == 0, global_step=1,
                              default_root_dir=str(Path(out).parent), logger=None, callbacks=[ema, preview])
    ema.on_fit_start(trainer, model)
    ema.shadow = doubled(dict(model.named_parameters()))  # an average that differs from the weights
    checkpoint: dict = {}
    ema.on_save_checkpoint(trainer, model, checkpoint)
    resumed = EMA(decay=0.5)
    resumed.on_load_checkpoint(trainer, model, checkpoint)
    written = preview.preview(trainer, model)
    if rank == 0:
        torch.save({"full": full, "round_trip": all(torch.equal(again[n], shards[n]) for n in shards),
                    "untouched": untouched, "sharded": sharded, "sample": x, "ema_saved": checkpoint[CKPT_KEY],
                    "ema_resumed": all(torch.equal(resumed.shadow[n], ema.shadow[n]) for n in ema.shadow),
                    "written": [str(p) for p in written]}, out)
    dist.barrier()  # both ranks done before either tears gloo down (else one may abort at exit)
    dist.destroy_process_group()


def test_shard_state_gathers_to_full_names_and_back_and_sampling_runs_on_every_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_main, args=(port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    ref = tiny()
    expected = doubled(dict(ref.named_parameters()))
    assert got["sharded"]  # each rank held only part of the weights
    assert set(got["full"]) == set(expected)  # the unwrapped model's names (no _fsdp_wrapped_module.)
    assert all(torch.equal(got["full"][n], expected[n]) for n in expected)
    assert got["round_trip"] and got["untouched"]
    sample = ref.generate(ref.cond.preview(2), 2, steps=3, cfg_scale=1.0, seed=0)
    assert torch.allclose(got["sample"], sample, atol=1e-5)
    # the EMA checkpoint holds full tensors under the unwrapped names (readable by `app sample`, any world
    # size), and a resumed EMA shards them back to what each rank held
    assert set(got["ema_saved"]) == set(expected) and all(torch.equal(got["ema_saved"][n], expected[n]) for n in expected)
    assert got["ema_resumed"]
    assert got["written"] and all(Path(p).is_file() for p in got["written"])  # both ranks sampled, rank 0 wrote
