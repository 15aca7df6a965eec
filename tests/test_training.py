"""models/training.py: the per-rank noise seeds."""

from __future__ import annotations

from models.training import noise_seed


def test_noise_seed_is_a_pure_function_distinct_per_rank_and_draw():
    seeds = {(r, d): noise_seed(7, r, d) for r in range(8) for d in range(200)}
    assert len(set(seeds.values())) == len(seeds)  # no two (rank, draw) pairs share a noise stream
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert noise_seed(7, 3, 5) == seeds[(3, 5)] and noise_seed(8, 3, 5) != seeds[(3, 5)]
    assert noise_seed(-1, 0, 0) == noise_seed(2**64 - 1, 0, 0)  # any int seed works (taken mod 2^64)


# ---------------------------------------------------------------- clipping under FSDP

def _fsdp_rank(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: FULL_SHARD FSDP on the CPU, a backward on this rank's inputs, then our clip."""
    import os
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from models.training import clip_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    root = FSDP(_net(), device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
                use_orig_params=True)  # as Lightning's FSDPStrategy builds it
    root(_inputs()[rank]).square().sum().backward()

    class Module:  # a LightningModule's two attributes clip_gradients reads; Lightning's FSDP clipping refuses
        _trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))

        def clip_gradients(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("Lightning's clip_gradients: refused under FSDP ('norm' not supported)")

    clip_gradients(Module(), None, max_norm=0.5)
    with FSDP.summon_full_params(root, with_grads=True):
        grads = [p.grad.clone() for p in root.parameters()]
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()  # both ranks done before either tears gloo down (else one may abort at exit)
    dist.destroy_process_group()


def _net():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _inputs():
    import torch

    return torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))


def test_clip_under_fsdp_clips_the_global_norm_over_every_shard(tmp_path) -> None:
    """configs/trainer/fsdp.yaml with grad_clip > 0: the root FSDP module clips (Lightning's FSDP precision
    plugin refuses norm clipping, which stopped such runs at their first step). The gradients equal an
    unsharded model's, clipped as one."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(port, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = _net()
    (ref(_inputs()[0]).square().sum() + ref(_inputs()[1]).square().sum()).div(2).backward()  # DDP/FSDP average
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    assert norm > 0.5  # the clip did something
    got = torch.load(tmp_path / "grads.pt")
    for g, r in zip(got, ref.parameters()):
        assert torch.allclose(g.reshape(r.grad.shape), r.grad, atol=1e-6)


def test_clip_outside_fsdp_is_lightnings() -> None:
    from types import SimpleNamespace

    from models.training import clip_gradients

    calls = []

    class Module:
        _trainer = SimpleNamespace(strategy=SimpleNamespace(model=None))

        def clip_gradients(self, optimizer: object, gradient_clip_val: float, gradient_clip_algorithm: str) -> None:
            calls.append((optimizer, gradient_clip_val, gradient_clip_algorithm))

    clip_gradients(Module(), "opt", 1.0)
    assert calls == [("opt", 1.0, "norm")]
