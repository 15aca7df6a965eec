"""`duoflow shards`: write WebDataset shards from a folder or from procedural generators."""

from __future__ import annotations

import argparse

from datamodules import synthetic, writers


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="duoflow shards", description="Write WebDataset tar shards.")
    sub = ap.add_subparsers(dest="source", required=True)
    add_media_parsers(sub)
    shp = sub.add_parser(
        "shapes", help="a mesh folder: <name>.ply|obj|off, or <class>/.../<name>.ply|obj|off, optional captions",
        description="Shard a folder of PLY/OBJ/OFF meshes into shape samples (surface points, occupancy queries and "
                    "labels), the data of the shape autoencoder. Class sub-folders are searched to any depth. "
                    + FOLDER_RULES.format(stored="Unreadable meshes")
                    + " Each mesh is turned z-up (--up-axis), centred and scaled into the ball of radius 0.9 (--scale); "
                    "meshes with (nearly) empty occupancy are written, counted and named. See datamodules/ingest_mesh.py.")
    shp.add_argument("src", help="folder of .ply/.obj/.off meshes, or of class sub-folders holding them")
    add_folder_options(shp, "meshes")
    shp.add_argument("--shard-size", type=int, default=1000, help="shapes per shard (default 1000)")
    shp.add_argument("--prefix", default="shape", help="shard file name prefix (default shape)")
    shp.add_argument("--points", type=int, default=2048, help="surface points stored per shape (default 2048)")
    shp.add_argument("--queries", type=int, default=2048, help="occupancy query points stored per shape (default 2048)")
    shp.add_argument("--up-axis", default="z", choices=("z", "y", "x"),
                     help="the meshes' up axis, turned to +z, the shards' up (default z; y for glTF/Blender/ShapeNet)")
    shp.add_argument("--scale", default="fit", type=mesh_scale,
                     help="fit: each mesh fills the ball of radius 0.9 (default; sizes lost); a number: cube units per "
                          "metre, sizes kept, larger meshes skipped (e.g. 0.5 fits objects up to 1.8 m across)")
    shp.add_argument("--units", default="m", choices=("m", "cm", "mm", "in", "ft"),
                     help="the unit of the mesh files, with a numeric --scale (default m)")
    shp.add_argument("--min-inside", type=float, default=0.01,
                     help="warn about (and count) meshes with fewer queries inside than this fraction (default 0.01)")
    enc = sub.add_parser(
        "encode-shapes", help="shape shards -> latent shards for ShapeFlow, with a trained shape autoencoder",
        description="Encode every shape of SRC (written by `shards shapes` or `shards synthetic shape`) to its latent "
                    "set with the autoencoder of --ckpt (deterministic: posterior mean, scaled), keeping cls, txt and "
                    "the surface points; OUT/encoder.json records the checkpoint. Train ShapeFlow on OUT.")
    enc.add_argument("--ckpt", required=True, help="ShapeAutoencoder checkpoint, e.g. runs/shape-ae/checkpoints/last.ckpt")
    enc.add_argument("src", help="shape shards (folder, glob or brace pattern)")
    enc.add_argument("out", help="output folder for the latent shards")
    enc.add_argument("--shard-size", type=int, default=1000, help="shapes per shard (default 1000)")
    enc.add_argument("--prefix", default="latent", help="shard file name prefix (default latent)")
    enc.add_argument("--batch-size", type=int, default=64, help="shapes encoded at once (default 64)")
    enc.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_encode_parser(sub)
    add_clip_parsers(sub)
    syn = sub.add_parser("synthetic", help="procedural data with class ids and captions")
    syn.add_argument("kind", choices=list(synthetic.SYNTHETIC_KINDS),
                     help="image (square shapes), image-mixed (mixed sizes and aspect ratios), video, audio (notes), "
                          "speech (spoken digits; needs the espeak-ng binary), shape, audiovideo")
    syn.add_argument("out", help="output folder for the shards")
    syn.add_argument("--num", type=int, required=True, help="number of samples")
    syn.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=None, help="image / video frame side in pixels (default: the kind's own)")
    return ap.parse_args(argv)


def mesh_scale(text: str) -> float | None:
    """``--scale``: "fit" (None) or a positive number."""
    if text == "fit":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'fit' or a number, got {text!r}") from None


FOLDER_RULES = ("With class sub-folders, class ids are the sorted folder names (OUT/classes.json); otherwise samples "
                "have no class unless --captions gives one. Captions: --captions, else <name>.txt, else <name>.json "
                "{{\"caption\": ...}}. {stored} are skipped, counted and named.")
"""The folder rules every folder command shares (datamodules/sources.py); {stored}: how files are kept and checked."""


def add_folder_options(p: argparse.ArgumentParser, noun: str) -> None:
    """OUT, --captions, --holdout and --workers: the same meaning for every folder command (datamodules/sources.py,
    datamodules/writers.py: ingest)."""
    p.add_argument("out", help="output folder for the shards (with --holdout: OUT/train and OUT/holdout)")
    p.add_argument("--captions", default=None, help="caption manifest: .csv (header: path,caption[,class]) or .jsonl")
    p.add_argument("--holdout", type=float, default=0.0,
                   help=f"fraction of {noun} (by a hash of their path) written to OUT/holdout, the rest to OUT/train")
    p.add_argument("--workers", type=int, default=1,
                   help=f"processes reading {noun} in parallel; the shards are the same for any number (default 1)")


def add_media_parsers(sub: argparse._SubParsersAction) -> None:
    """``shards images`` and ``shards audio``: one sample per file, stored as its original bytes."""
    for name, noun, formats, extensions, kept, prefix in (
        ("images", "images", "PNG/JPEG/WebP images", "png|jpg|jpeg|webp", "Images are decoded once here and stored as their original bytes; "
         "empty, truncated, non-image and oversized files", "img"),
        ("audio", "audio files", "WAV/FLAC files", "wav|flac", "Audio is decoded once here and stored as its original bytes; empty and "
         "unreadable files", "audio"),
    ):
        p = sub.add_parser(name, help=f"a folder of {noun}: <name>.{extensions} or <class>/<name>.*, optional captions",
                           description=f"Shard a folder of {formats}. " + FOLDER_RULES.format(stored=kept))
        p.add_argument("src", help=f"folder of {noun}, or of class sub-folders holding them")
        add_folder_options(p, noun)
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--prefix", default=prefix, help=f"shard file name prefix (default {prefix})")
        if name == "audio":
            add_audio_clip_options(p)


def add_audio_clip_options(p: argparse.ArgumentParser) -> None:
    """``shards audio``: cut long recordings, resample, level (datamodules/audio_clips.py); any of them re-encodes."""
    g = p.add_argument_group("clips", "Any of these stores each clip as 16-bit mono WAV (channels averaged) with its "
                                      "source path and start/end seconds in its json, instead of the file's own bytes.")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="cut recordings into clips of at most this many seconds, at the quietest 20 ms between half of "
                        "it and all of it (default: never cut)")
    g.add_argument("--min-seconds", type=float, default=0.0, help="drop clips (and files) shorter than this (default 0)")
    g.add_argument("--sample-rate", type=int, default=None, help="resample to this rate in Hz (default: each file's own)")
    g.add_argument("--loudness", type=float, default=None, metavar="DBFS",
                   help="set each clip's RMS level to this many dBFS, e.g. -20 (peak-limited; default: levels kept)")
    g.add_argument("--silence-db", type=float, default=-60.0,
                   help="drop clips whose RMS level is below this many dBFS (default -60; only when clips are re-encoded)")


def add_encode_parser(sub: argparse._SubParsersAction) -> None:
    enc = sub.add_parser(
        "encode", help="media shards (or a media folder) -> latent shards with a pretrained autoencoder and text encoders",
        description="Encode every sample of SRC once with a frozen pretrained autoencoder (and its caption with each "
                    "text encoder) into latent shards that training reads instead of the media. Resumable (re-run it), "
                    "split across the ranks of a torchrun/Slurm job; OUT/manifest.json and OUT/latent-stats.json "
                    "record the models and the per-channel latent statistics. See README 'Your own data with "
                    "pretrained autoencoders and text encoders'.")
    enc.add_argument("src", help="media shards (folder, glob or brace pattern) or a folder of image/audio files")
    enc.add_argument("out", help="output folder for the latent shards (re-run to resume)")
    enc.add_argument("--autoencoder", required=True,
                     help="diffusers autoencoder folder (AutoencoderKL, AutoencoderDC, AutoencoderKLWan, "
                          "AutoencoderKLLTXVideo, AutoencoderOobleck), e.g. a pipeline folder with --subfolder vae")
    enc.add_argument("--subfolder", default=None, help="the autoencoder's sub-folder (SD3/Flux/Wan pipelines: vae)")
    enc.add_argument("--dtype", default="float32", help="autoencoder weights: float32, bfloat16, float16 (default float32)")
    enc.add_argument("--text-encoder", action="append", default=[], metavar="PATH[,key=value...]",
                     help="a transformers text encoder folder, repeatable (SD3: two CLIPs and a T5); options: "
                          "subfolder, tokenizer_subfolder, kind, max_length, dtype, layer; PATH may be package:NAME")
    enc.add_argument("--audio-autoencoder", default=None,
                     help="audio-video: the soundtrack's autoencoder (AutoencoderOobleck) beside the video --autoencoder")
    enc.add_argument("--audio-subfolder", default=None, help="the audio autoencoder's sub-folder")
    enc.add_argument("--fps", type=int, default=8, help="audio-video: frame rate of the clips (default 8)")
    enc.add_argument("--size", type=int, default=256, help="image / frame side in pixels (default 256)")
    enc.add_argument("--keep-aspect", action="store_true", help="images keep their aspect ratio (about size^2 pixels)")
    enc.add_argument("--max-frames", type=int, default=17, help="longest clip in frames (default 17)")
    enc.add_argument("--sample-rate", type=int, default=None, help="audio rate (default: the autoencoder's)")
    enc.add_argument("--max-seconds", type=float, default=10.0, help="longest audio clip kept (default 10)")
    enc.add_argument("--min-seconds", type=float, default=0.1, help="shorter audio clips are skipped (default 0.1)")
    enc.add_argument("--batch-size", type=int, default=16, help="samples encoded at once (default 16)")
    enc.add_argument("--shard-size", type=int, default=1000, help="samples per shard when sharding a media folder")
    enc.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this rank's GPU, else cpu)")


def add_clip_parsers(sub: argparse._SubParsersAction) -> None:
    """``shards videos`` and ``shards audiovideo``: video files -> clip shards (datamodules/ingest_video.py)."""
    for name, kind in (("videos", "video"), ("audiovideo", "audio-video")):
        sound = name == "audiovideo"
        p = sub.add_parser(
            name, help=f"a folder of video files -> {kind} clip shards (<name>.mp4|webm|mov|mkv|avi|gif or <class>/<name>.*)",
            description="Cut every video of SRC into clips of --frames frames at --fps (frame k = the source frame shown "
                        "at start + k/fps), every --stride seconds, resized to --size, and store each clip as npy uint8 "
                        "(T, H, W, 3) with json metadata" + (" and its soundtrack (mono wav at --sample-rate, exactly "
                        "the clip's span); videos without audio are skipped" if sound else "") + ". "
                        + FOLDER_RULES.format(stored="Unreadable and too short files"))
        p.add_argument("src", help="folder of video files, or of class sub-folders holding them")
        add_folder_options(p, "videos")
        p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
        p.add_argument("--fps", type=float, default=8.0, help="frame rate of the clips (default 8)")
        p.add_argument("--stride", type=float, default=None,
                       help="seconds between clip starts (default frames/fps: back to back; shorter overlaps)")
        p.add_argument("--max-clips", type=int, default=None, help="most clips per video, the first ones (default all)")
        p.add_argument("--size", type=int, default=256, help="frame side: shorter side resized, centre square (default 256)")
        p.add_argument("--keep-aspect", action="store_true", help="keep the aspect ratio: about size^2 pixels, no crop")
        p.add_argument("--multiple", type=int, default=16, help="with --keep-aspect, sides are multiples of this (default 16)")
        p.add_argument("--min-motion", type=float, default=None,
                       help="skip clips whose mean absolute frame difference (0-255 levels) is below this (default off)")
        if sound:
            p.add_argument("--sample-rate", type=int, default=16000, help="soundtrack rate in Hz (default 16000)")
        p.add_argument("--max-frames-read", type=int, default=100_000,
                       help="source frames decoded per video at most; a longer one gives the clips of its first frames "
                            "and is named as cut short (default 100000)")
        p.add_argument("--shard-size", type=int, default=100, help="clips per shard (default 100; npy clips are large)")
        p.add_argument("--prefix", default=name.rstrip("s"), help=f"shard file name prefix (default {name.rstrip('s')})")


def write_clips(args: argparse.Namespace) -> list[str]:
    from datamodules.ingest_video import write_video_clips  # PyAV and the clip cutter only when sharding videos
    from datamodules.video_clips import ClipOptions

    options = ClipOptions(frames=args.frames, fps=args.fps, stride=args.stride, max_clips=args.max_clips, size=args.size,
                          keep_aspect=args.keep_aspect, multiple=args.multiple, min_motion=args.min_motion,
                          sample_rate=getattr(args, "sample_rate", None), max_frames_read=args.max_frames_read)
    report = write_video_clips(args.src, args.out, options, captions=args.captions, holdout=args.holdout,
                               workers=args.workers, shard_size=args.shard_size, prefix=args.prefix)
    print(report.summary())
    return report.paths


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.source == "images":
        paths = writers.write_image_folder(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix,
                                           captions=args.captions, holdout=args.holdout, workers=args.workers)
    elif args.source == "audio":
        from datamodules.audio import write_audio_folder  # torchaudio only when sharding audio
        from datamodules.audio_clips import AudioClipOptions

        clips = AudioClipOptions(max_seconds=args.max_seconds, min_seconds=args.min_seconds, sample_rate=args.sample_rate,
                                 loudness=args.loudness, silence_db=args.silence_db)
        paths = write_audio_folder(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix,
                                   captions=args.captions, holdout=args.holdout, clips=clips, workers=args.workers)
    elif args.source == "shapes":
        from datamodules.ingest_mesh import MeshOptions, write_mesh_folder

        options = MeshOptions(points=args.points, queries=args.queries, up=args.up_axis, scale=args.scale,
                              units=args.units, min_inside=args.min_inside)
        report = write_mesh_folder(args.src, args.out, options, shard_size=args.shard_size, prefix=args.prefix,
                                   workers=args.workers, captions=args.captions, holdout=args.holdout)
        print(report.summary())
        paths = report.paths
    elif args.source in ("videos", "audiovideo"):
        paths = write_clips(args)
    elif args.source == "encode":
        from app.encode import run  # loads diffusers and transformers

        paths = run(args)
    elif args.source == "encode-shapes":
        from app.shape_latents import encode_shape_shards  # loads Lightning and the autoencoder

        paths = encode_shape_shards(args.ckpt, args.src, args.out, batch_size=args.batch_size,
                                    shard_size=args.shard_size, prefix=args.prefix, device=args.device)
    else:
        paths = synthetic.write_synthetic(args.kind, args.out, args.num, shard_size=args.shard_size,
                                          seed=args.seed, image_size=args.size)
    print(f"wrote {len(paths)} shards to {args.out}: {paths[0]} .. {paths[-1]}" if paths else f"wrote no shards to {args.out}")
    return 0
