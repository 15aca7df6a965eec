"""`duoflow datasets`: export small real data sets that need no download, as image folders.

    duoflow datasets digits data/digits-png --size 16
    duoflow shards images data/digits-png/train data/digits/train
    duoflow shards images data/digits-png/test data/digits/test

digits: scikit-learn's bundled handwritten digits (UCI optical recognition data set: 1797 real
8x8 scans of digits written by 43 people, 16 grey levels), the smallest real-data benchmark that
trains on a CPU. Written as grey PNGs, white ink on black, to ``OUT/train/<digit>/<index>.png``
and ``OUT/test/<digit>/<index>.png`` (index = row in ``load_digits``), split 80/20 stratified by
class with a fixed seed, so every run and every machine gets the same split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from app.errors import UserError

RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow datasets", description="Export a bundled real data set as image folders.")
    sub = ap.add_subparsers(dest="name", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's 1797 handwritten 8x8 digit scans "
                            "-> OUT/{train,test}/<digit>/*.png")
    digits.add_argument("out", help="output folder (gets train/ and test/)")
    digits.add_argument("--size", type=int, default=16, help="image side in pixels (default 16; 8 = the scans as they are)")
    digits.add_argument("--resample", choices=sorted(RESAMPLING), default="bilinear",
                        help="upscaling filter: bilinear (default) turns the 8x8 blocks into smooth strokes; "
                             "nearest keeps the blocky scan")
    digits.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction per class (default 0.2)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    return ap.parse_args(argv)


def digits_images(size: int = 16, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """(1797, size, size) uint8 images (0..16 grey levels scaled to 0..255) and (1797,) labels 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    if size != 8:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), RESAMPLING[resample])) for im in images])
    return images, data.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): round(test_fraction * n_c) of each class c held out, chosen by seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def write_digits(out: str | Path, size: int = 16, resample: str = "bilinear", test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, int]:
    """Write OUT/{train,test}/<digit>/<index>.png; returns the number of images per split."""
    if size < 1:
        raise UserError(f"--size {size}: expected a positive image side")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction {test_fraction}: expected a fraction between 0 and 1")
    images, labels = digits_images(size, resample)
    counts = {}
    for split, indices in zip(("train", "test"), stratified_split(labels, test_fraction, seed)):
        for i in indices:
            folder = Path(out) / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        counts[split] = len(indices)
    return counts


def main(argv: list[str]) -> int:
    args = parse(argv)
    counts = write_digits(args.out, args.size, args.resample, args.test_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['test']} test digit images ({args.size}x{args.size}) to {args.out}; "
          f"next: duoflow shards images {args.out}/train data/digits/train (and the same for test)")
    return 0
