"""`duoflow shards`: write WebDataset shards from a folder or from procedural generators."""

from __future__ import annotations

import argparse

from datamodules import synthetic, writers


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow shards", description="Write WebDataset tar shards.")
    sub = ap.add_subparsers(dest="source", required=True)
    img = sub.add_parser("images", help="an image folder (one sub-folder per class, optional same-name .txt captions)")
    img.add_argument("src", help="folder with one sub-folder per class")
    img.add_argument("out", help="output folder for the shards")
    img.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    img.add_argument("--prefix", default="img", help="shard file name prefix (default img)")
    syn = sub.add_parser("synthetic", help="procedural data with class ids and captions")
    syn.add_argument("kind", choices=list(synthetic.SYNTHETIC_KINDS),
                     help="image (square shapes), image-mixed (mixed sizes and aspect ratios), video, audio, shape, audiovideo")
    syn.add_argument("out", help="output folder for the shards")
    syn.add_argument("--num", type=int, required=True, help="number of samples")
    syn.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=None, help="image / video frame side in pixels (default: the kind's own)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.source == "images":
        paths = writers.write_image_folder(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix)
    else:
        paths = synthetic.write_synthetic(args.kind, args.out, args.num, shard_size=args.shard_size,
                                          seed=args.seed, image_size=args.size)
    print(f"wrote {len(paths)} shards to {args.out}: {paths[0]} .. {paths[-1]}" if paths else f"wrote no shards to {args.out}")
    return 0
