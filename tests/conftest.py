"""Shared fixtures: small synthetic shards written once per session, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")



@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """W&B puts its service's address in this process's environment (WANDB_SERVICE) for child processes to
    share. A later test's subprocesses (a Slurm job, DDP ranks) would then log through this session's service,
    where the run id of a killed rank's unfinished run stays "in use" and the requeued run cannot start.
    Every test, and every fixture it sets up (a module's cluster copies the environment), starts without it,
    as a job on a cluster does."""
    os.environ.pop("WANDB_SERVICE", None)


ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/image/tiny.yaml")
# the tiny image config shrunk so a training step takes milliseconds
SMALL = [
    "--model.init_args.tokenizer.size", "16",  # the data transform follows the model
    "--model.init_args.backbone.dim", "32", "--model.init_args.backbone.heads", "2",
    "--model.init_args.backbone.depth_dual", "1", "--model.init_args.backbone.depth_single", "1",
    "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
]


def velocity(model, x_t, t, cond: dict, drop):
    """v(x_t, t | cond) of a single-stream generator in the latents' own form (a tensor, or a list of
    samples of different sizes): what the tests compare; the model itself works on tokens."""
    from models.tokens import tokenize, untokenize

    x = tokenize(model.tokenizer, x_t)
    (v,) = model.velocity_tokens([x], t, cond, drop)
    return untokenize(model.tokenizer, x.with_x(v))


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("image-shards")
    write_synthetic("image", str(out), num=96, shard_size=32, seed=0, image_size=16, progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory):
    """Small synthetic shard sets by kind ("image", "video", "audio", ...), written once per session."""
    from datamodules.synthetic import write_synthetic

    made: dict[str, Path] = {}

    def get(kind: str, num: int = 48) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"{kind}-shards")
            write_synthetic(kind, str(out), num=num, shard_size=16, seed=0, image_size=16 if "image" in kind else None,
                            progress=False)
            made[kind] = out
        return made[kind]

    return get


@pytest.fixture(scope="session")
def shape_latents(tmp_path_factory: pytest.TempPathFactory, synthetic_shards) -> tuple[Path, Path]:
    """(checkpoint of a tiny untrained ShapeAutoencoder saved through Lightning, latent shards it encoded)
    for ShapeFlow tests: untrained weights decode to some shape, and saving skips a training run."""
    import lightning as L

    from app.shape_latents import encode_shape_shards
    from models.codecs.shape import ShapeAEConfig
    from models.shape_autoencoder import ShapeAutoencoder

    out = tmp_path_factory.mktemp("shape-latents")
    cfg = ShapeAEConfig(latents=16, latent_dim=4, width=32, heads=2, enc_self_layers=0, dec_layers=1, fourier_bands=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(ShapeAutoencoder(cfg))
    ckpt = out / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    encode_shape_shards(str(ckpt), str(synthetic_shards("shape")), str(out / "latents"), points=256, progress=False)
    return ckpt, out / "latents"


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random diffusers autoencoders ("kl" in a pipeline layout with vae/, "dc", "wan", "ltx",
    "oobleck") and transformers text encoders ("t5", "sd3" with two CLIPs, "bert"), saved once per
    session with save_pretrained: loaded only through duoflow's own code."""
    from tests.pretrained_models import save_autoencoders, save_text_encoders

    root = tmp_path_factory.mktemp("pretrained")
    return {**save_autoencoders(root / "autoencoders"), **save_text_encoders(root / "text")}


LATENT_CASES = {"image": ("image", "kl", {"size": 16}), "video": ("video", "wan", {"size": 16, "max_frames": 8}),
                "audio": ("audio", "oobleck", {"max_seconds": 0.5}),
                "audiovideo": ("audiovideo", "wan", {"size": 16, "max_frames": 8, "fps": 8})}
"""modality -> (synthetic kind, tiny autoencoder, encode options) of the latent-shard fixtures."""


@pytest.fixture(scope="session")
def latent_shards(tmp_path_factory: pytest.TempPathFactory, pretrained, synthetic_shards):
    """modality -> (a pipeline folder whose vae/ is the tiny autoencoder, latent shards it encoded with
    the tiny T5's caption embeddings), made once per session; audio-video's soundtrack autoencoder
    (the tiny Oobleck) is the pipeline folder's sound/vae."""
    from app.encode import encode_shards
    from models.text_encoders import TextEncoderSpec

    made: dict[str, tuple[Path, Path]] = {}

    def get(modality: str) -> tuple[Path, Path]:
        if modality not in made:
            kind, autoencoder, options = LATENT_CASES[modality]
            root = tmp_path_factory.mktemp(f"{modality}-latents")
            (root / "pipeline").mkdir()
            source = pretrained[autoencoder] / "vae" if autoencoder == "kl" else pretrained[autoencoder]
            (root / "pipeline" / "vae").symlink_to(source)
            if modality == "audiovideo":
                (root / "pipeline" / "sound").mkdir()
                (root / "pipeline" / "sound" / "vae").symlink_to(pretrained["oobleck"])
                options = {**options, "audio_autoencoder": str(root / "pipeline" / "sound"), "audio_subfolder": "vae"}
            encode_shards(str(synthetic_shards(kind)), str(root / "latents"), str(root / "pipeline"), subfolder="vae",
                          text_encoders=[TextEncoderSpec(str(pretrained["t5"]), max_length=16)], batch_size=8,
                          device="cpu", progress=False, **options)
            made[modality] = root / "pipeline", root / "latents"
        return made[modality]

    return get
