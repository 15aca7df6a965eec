"""The evaluator of each generator: images (feature-net FID, precision/recall, CAS), video, audio and
audio-video (procedural checkers), 3D shapes (point-cloud coverage/MMD). One EVALUATORS entry per
generator class; the bases are in app/evaluation/evaluators.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from app.errors import UserError
from app.evaluation.checkers.audio import audio_scores
from app.evaluation.checkers.audiovideo import sync_scores
from app.evaluation.checkers.image import caption_scores, parse_caption
from app.evaluation.checkers.shape import coverage_mmd_from, pairwise_chamfer, shape_class_accuracy
from app.evaluation.checkers.video import video_scores
from app.evaluation.evaluators import CheckerEvaluator, Evaluator, FeatureEvaluator, class_names_of, known_labels
from app.evaluation.feature_net import as_frames
from app.evaluation.metrics import accuracy, frechet_from_features
from datamodules.audio import AudioTransform
from datamodules.audiovideo import AudioVideoTransform
from datamodules.media.image import to_uint8_images
from datamodules.media.mesh import grid_to_mesh, sample_mesh_surface
from datamodules.shapes import SurfacePoints
from datamodules.shards import read_samples
from datamodules.synthetic import SHAPES
from datamodules.transforms import ImageTransform, SampleTransform
from datamodules.video import VideoTransform
from models.generators import AudioFlow, AudioVideoFlow, ImageFlow, ShapeFlow, VideoFlow


class ImageEvaluator(FeatureEvaluator):
    """Images: FID, precision, recall and CAS with a FeatureNet trained on the training shards.

    `fid` is a Fréchet distance in OUR feature net's space, not Inception's: compare it only
    between evaluations that share the same feature-net.pt, never with published FIDs."""

    fd_name = "fid"
    descriptions = {
        "fid": "Fréchet distance of feature-net embeddings (lower is better; 0 = same statistics)",
        "precision": "fraction of generated samples on the real manifold (realism)",
        "recall": "fraction of real samples on the generated manifold (coverage)",
        "cas": "feature-net accuracy on generated samples labelled by their class (CAS)",
        "real_acc": "feature-net accuracy on the real held-out samples (the ceiling of cas)",
        "colour_accuracy": "text models on synthetic captions: the checker reads the caption's colour back",
        "shape_accuracy": "... the caption's shape",
        "position_accuracy": "... the caption's position (top/bottom, left/right, centre)",
        "caption_accuracy": "... colour, shape and position all right (caption following)",
        "real_caption_accuracy": "caption_accuracy of the real held-out images (the ceiling)",
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.size = int(self.model.media_spec().size)
        self.net = self.train_feature_net()

    def transform(self) -> SampleTransform:
        return self.following_model(ImageTransform())

    def embed(self, media: Tensor) -> tuple[Tensor, Tensor]:
        x = media.float().clamp(-1.0, 1.0)  # what a saved image shows; an untrained model's noise goes past +-1
        side = self.net.meta.get("size", self.size)
        if x.shape[-2:] != (side, side):
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        return self.net.embed(x)


    def captions(self, held_out: dict[str, Any]) -> list[str] | None:
        """The held-out captions a text model is conditioned on, when they are synthetic shape captions
        (the caption-following checker reads colour, shape and position back); else None."""
        captions = list(held_out.get("txt") or [])
        text_model = self.model.cond.num_classes is None
        if not text_model or not captions or any(parse_caption(c) is None for c in captions):
            return None
        return captions

    def reference(self, held_out: dict[str, Any]) -> dict[str, Any]:
        reference = super().reference(held_out)
        captions = self.captions(held_out)
        if captions is not None:
            real = caption_scores(to_uint8_images(self.as_generated(held_out)), captions)
            reference.update(captions=captions, real_caption={f"real_{k}": v for k, v in real.items()})
        return reference

    def scores(self, generated: Any, labels: Tensor | None, reference: dict[str, Any]) -> dict[str, float]:
        out = super().scores(generated, labels, reference)
        if reference.get("captions") is not None:  # generated[i] was conditioned on captions[i] (run.conditions_for)
            out.update(caption_scores(to_uint8_images(generated), reference["captions"][: len(generated)]))
            out.update(reference["real_caption"])
        return out


class VideoEvaluator(CheckerEvaluator):
    """Clips: a frame feature net trained on the training clips' frames gives the per-frame Fréchet distance and
    the clip's class (its frames' mean logits: `cas`, with the held-out clips' `real_acc` as the ceiling) for any
    video. On the bouncing-shape clips (synthetic_videos: the training classes are the procedural shapes) the
    procedural checker also reads shape, motion and frame validity back from every clip
    (app/evaluation/checkers/video.py); the held-out clips scored the same way give the `real_` ceiling."""

    labelled, ceiling = ("shape_accuracy",), ("shape_accuracy", "temporal_consistency")

    descriptions = {
        "frame_fd": "per-frame Fréchet distance in a feature net trained on the training clips' frames (lower is better)",
        "cas": "clips whose frames the feature net assigns (mean logits) to the class they were generated for",
        "real_acc": "the same for the real held-out clips (the ceiling of cas)",
        "shape_accuracy": "bouncing shapes: checker's majority shape over the clip equals the class it was generated for",
        "temporal_consistency": "bouncing shapes: frame pairs where one rigid shape moves on as the synthetic physics would",
        "valid_frames": "bouncing shapes: frames showing one object of plausible size (noise and flat colour fail)",
        "real_shape_accuracy": "shape_accuracy of the real held-out clips (the ceiling)",
        "real_temporal_consistency": "temporal_consistency of the real held-out clips",
    }

    def transform(self) -> SampleTransform:
        return self.following_model(VideoTransform())  # clips as long as the model samples

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.net = self.train_feature_net(self.transform())
        self.procedural = class_names_of(self.train_shards) == list(SHAPES)

    def clip_features(self, clips: Any) -> tuple[Tensor, Tensor]:
        """(features of every frame (sum T, D), class logits of every clip (N, K): its frames' mean)."""
        clips = [c.float().clamp(-1.0, 1.0) for c in clips]
        frames, _ = as_frames(clips, torch.zeros(len(clips), dtype=torch.long))
        features, logits = self.net.embed(frames.to(self.device))
        per_clip = logits.split([c.shape[1] for c in clips])
        return features, torch.stack([frame_logits.mean(0) for frame_logits in per_clip])

    def check(self, clips: Any, labels: list[int]) -> dict[str, float]:
        if not self.procedural:
            return {}
        return video_scores([to_uint8_images(c.transpose(0, 1)) for c in clips], labels)  # each (T, H, W, 3)

    def reference(self, held_out: dict[str, Any]) -> dict[str, Any]:
        features, logits = self.clip_features(self.as_generated(held_out))
        return {"scores": super().reference(held_out), "features": features, "logits": logits,
                "labels": known_labels(held_out)}

    def scores(self, generated: Any, labels: Tensor | None, reference: dict[str, Any]) -> dict[str, float]:
        features, logits = self.clip_features(generated)
        out = {"frame_fd": frechet_from_features(reference["features"], features)}
        if labels is not None:
            out["cas"] = accuracy(logits, labels)
        if reference["labels"] is not None:
            out["real_acc"] = accuracy(reference["logits"], reference["labels"])
        return {**out, **super().scores(generated, labels, reference["scores"])}


class AudioEvaluator(CheckerEvaluator):
    """Note clips (synthetic_audio): the procedural checker reads timbre, pitch and voicing back from every
    clip (app/evaluation/checkers/audio.py); nothing is trained. The held-out clips scored the same way give the
    `real_` ceiling (Griffin-Lim costs a little of it: see tests/test_audio.py)."""

    labelled, ceiling = ("timbre_accuracy",), ("timbre_accuracy", "pitch_in_scale")

    descriptions = {
        "mel_fd": "Fréchet distance of per-clip log-mel statistics (mean and std of each mel band; lower is better)",
        "timbre_accuracy": "checker's timbre equals the class the clip was generated for",
        "pitch_in_scale": "voiced notes within 50 cents of a scale pitch",
        "voiced_clips": "clips with at least one pitched note (noise and silence have none)",
        "real_timbre_accuracy": "timbre_accuracy of the real held-out clips (the ceiling)",
        "real_pitch_in_scale": "pitch_in_scale of the real held-out clips",
    }

    def transform(self) -> SampleTransform:
        return self.following_model(AudioTransform(max_seconds=60.0, min_seconds=0.0))

    def check(self, waves: Any, labels: list[int]) -> dict[str, float]:
        return audio_scores([w.detach().float().cpu().numpy() for w in waves], labels, self.model.sample_rate)

    def mel_features(self, waves: Any) -> Tensor:
        """(N, 2M): each clip's log-mel band means and standard deviations over time, with the model's
        own mel codec (hand-made features: no network to train or download, stable across runs)."""
        codec = self.model.codec
        device = codec.fbank.device
        feats = []
        for w in waves:
            mel = codec.encode(w.detach().float().reshape(1, -1).to(device))[0]  # (M, F)
            feats.append(torch.cat([mel.mean(dim=-1), mel.std(dim=-1, unbiased=False)]).cpu())
        return torch.stack(feats)

    def reference(self, held_out: dict[str, Any]) -> dict[str, Any]:
        return {"scores": super().reference(held_out), "features": self.mel_features(held_out["x"])}

    def scores(self, generated: Any, labels: Tensor | None, reference: dict[str, Any]) -> dict[str, float]:
        fd = frechet_from_features(reference["features"], self.mel_features(generated))
        return {"mel_fd": fd, **super().scores(generated, labels, reference["scores"])}

class ShapeEvaluator(Evaluator):
    """3D shapes: point-cloud scores (app/evaluation/checkers/shape.py) of generated shapes against held-out ones.

    A generated occupancy grid becomes a mesh by marching cubes (as in the PLY files) and `points`
    surface points; real shapes give their first `points` stored surface points. The class accuracy
    is a 1-NN classifier by Chamfer distance over labelled TRAINING shapes (the first `train_shapes`),
    so nothing is fitted to the held-out set; its accuracy on the held-out shapes is the ceiling."""

    points: ClassVar[int] = 512
    """Surface points per shape (Chamfer costs grow with it)."""
    train_shapes: ClassVar[int] = 200
    """Labelled training shapes of the nearest-neighbour classifier."""
    descriptions = {
        "coverage": "held-out shapes that are the nearest (Chamfer) of some generated shape (COV, higher is better)",
        "mmd": "mean Chamfer distance of each held-out shape to its closest generated shape (MMD, lower is better)",
        "fidelity": "mean Chamfer distance of each generated shape to its closest held-out shape (lower is better)",
        "class_acc": "generated shapes whose nearest training shape has the class they were generated for",
        "real_acc": "the same for the real held-out shapes (the ceiling of class_acc)",
        "empty": "generated grids without a surface (scored as all points at the centre)",
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        train = read_samples(self.train_shards, self.transform(), self.train_shapes)
        self.train_points, self.train_labels = list(train["x"].numpy()), known_labels(train)

    def transform(self) -> SampleTransform:
        return SurfacePoints(self.points)

    def point_sets(self, shapes: Tensor) -> tuple[list, float]:
        """Occupancy grids (B, R, R, R), or point sets (B, N, 3) as they are -> point sets, fraction empty."""

        if shapes.ndim == 3 and shapes.shape[-1] == 3:
            return list(shapes.float().numpy()), 0.0
        sets, empty = [], 0
        for i, grid in enumerate(shapes):
            vertices, faces = grid_to_mesh(grid)
            if len(faces):
                sets.append(sample_mesh_surface(vertices, faces, self.points, np.random.default_rng(self.seed + i)))
            else:
                sets.append(np.zeros((self.points, 3), np.float32))
                empty += 1
        return sets, empty / len(shapes)

    def class_accuracy(self, sets: list, labels: Tensor | None) -> dict[str, float]:
        if labels is None or self.train_labels is None:
            return {}
        return {"acc": shape_class_accuracy(sets, labels.tolist(), self.train_points, self.train_labels.tolist())}

    def reference(self, held_out: dict[str, Any]) -> dict[str, Any]:
        sets, _ = self.point_sets(held_out["x"])
        return {"points": sets, **{f"real_{k}": v for k, v in self.class_accuracy(sets, known_labels(held_out)).items()}}

    def scores(self, generated: Tensor, labels: Tensor | None, reference: dict[str, Any]) -> dict[str, float]:
        sets, empty = self.point_sets(generated)
        d = pairwise_chamfer(sets, reference["points"])  # (G, R)
        out = {**coverage_mmd_from(d), "fidelity": float(d.min(axis=1).mean())}
        out.update({f"class_{k}": v for k, v in self.class_accuracy(sets, labels).items()})
        out.update({k: v for k, v in reference.items() if k != "points"})
        return {**out, "empty": empty}

    def info(self) -> dict[str, Any]:
        return {"points": self.points, "train_shapes": len(self.train_points)}

class SyncEvaluator(CheckerEvaluator):
    """Audio-video clips (synthetic_audiovideo): distance from each visual floor contact to the nearest
    audio onset (app/evaluation/checkers/audiovideo.py); nothing is trained. The held-out clips give `real_`."""

    ceiling = ("sync_offset_ms", "sync_f1")

    descriptions = {
        "sync_offset_ms": "mean distance from a visual contact to the nearest audio onset (ms, capped at 500)",
        "sync_offset_frames": "the same in video frames",
        "sync_f1": "contacts and onsets matched within half a frame (F1)",
        "contact_clips": "clips showing a floor contact (noise shows none)",
        "real_sync_offset_ms": "sync_offset_ms of the real held-out clips (the floor)",
        "real_sync_f1": "sync_f1 of the real held-out clips",
    }

    def transform(self) -> SampleTransform:
        return self.following_model(AudioVideoTransform(max_frames=4096))

    def as_generated(self, held_out: dict[str, Any]) -> Any:
        return held_out["x"], held_out["audio"]

    def check(self, generated: Any, labels: list[int]) -> dict[str, float]:
        videos, audios = generated
        clips = [to_uint8_images(v.transpose(0, 1)) for v in videos]  # each (T, H, W, 3)
        waves = [a.detach().float().cpu().numpy() for a in audios]
        return sync_scores(clips, waves, self.model.fps, self.model.sample_rate)

def _generator_classes() -> dict[type, type[Evaluator]]:

    return {ImageFlow: ImageEvaluator, VideoFlow: VideoEvaluator, AudioFlow: AudioEvaluator, ShapeFlow: ShapeEvaluator,
            AudioVideoFlow: SyncEvaluator}

EVALUATORS = _generator_classes()
"""Generator class -> its Evaluator (subclasses inherit their base's). Add one line per modality."""

def evaluator_for(model: Any) -> type[Evaluator]:
    """The Evaluator of the generator's class, or of its nearest base class that has one."""
    for klass in type(model).__mro__:
        if klass in EVALUATORS:
            return EVALUATORS[klass]
    known = ", ".join(k.__name__ for k in EVALUATORS)
    raise UserError(f"no evaluator for {type(model).__name__} yet; generators with metrics: {known}")
