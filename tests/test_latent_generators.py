"""Generators on pretrained first stages and text encoders: cached and on-the-fly latents agree,
captions of their own lengths are packed (padding never attended), checkpoints keep folders and
fingerprints but not the pretrained weights."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.backbone import MMDiTConfig
from models.codecs.pretrained import PretrainedAutoencoder
from models.conditioning import PretrainedText
from models.flow import Euler
from models.generators import ImageFlow
from models.text_encoders import TextEncoders, TextEncoderSpec
from models.tokenizers.image import ImagePatches
from models.tokens import tokenize, untokenize

CAPTIONS = ["a red circle on the left", "a blue square", "a green triangle moving up", ""]


def latent_flow(pretrained: dict[str, Path], **kw) -> ImageFlow:
    torch.manual_seed(0)
    codec = PretrainedAutoencoder(str(pretrained["kl"]), subfolder="vae")
    text = PretrainedText(encoders=(TextEncoderSpec(str(pretrained["t5"]), max_length=16),
                                    TextEncoderSpec(str(pretrained["sd3"]), subfolder="text_encoder",
                                                    tokenizer_subfolder="tokenizer")))
    return ImageFlow(tokenizer=ImagePatches(codec.latent_channels, 8, 2), codec=codec, conditioning=text,
                     backbone=MMDiTConfig(dim=32, heads=2, depth_dual=1, depth_single=1), sampler=Euler(steps=3), **kw)


def cached_batch(model: ImageFlow, images: torch.Tensor, captions: list[str]) -> dict:
    """What CachedLatents hands the model for samples `duoflow shards encode` stored."""
    encoded = model.cond.text.encode(captions)
    tokens = [list(t) for t in zip(*(encoded.unpadded(i) for i in range(len(encoded.tokens))))]
    return {"x_latent": model.codec.encode_raw(images), "txt": captions, "txt_tokens": tokens,
            "txt_pooled": encoded.pooled}


def test_cached_latents_and_embeddings_train_exactly_as_on_the_fly(pretrained) -> None:
    model = latent_flow(pretrained)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    live = {"x": images, "txt": CAPTIONS}
    cached = cached_batch(model, images, CAPTIONS)
    torch.testing.assert_close(model.latents(cached)[0], model.latents(live)[0], atol=1e-6, rtol=1e-6)
    assert model.latents(live)[0].shape == (4, 4, 8, 8)
    losses = [model.loss(b, torch.Generator().manual_seed(3)) for b in (live, cached)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert model.num_samples(cached) == model.num_samples(live) == 4


def test_captions_are_packed_at_their_own_lengths(pretrained) -> None:
    """Each sample's velocity equals the sample alone: caption tokens of other lengths are never padded in."""
    model = latent_flow(pretrained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave the zero init, so the velocity depends on everything
    caption_tokens = [sum(x.shape[0] for x in t) for t in model.cond.embeddings({"txt": CAPTIONS})[0]]
    assert len(set(caption_tokens)) > 1, caption_tokens  # the captions really have different lengths
    z = torch.randn(4, 4, 8, 8)
    t = torch.rand(4)

    def velocity(z: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = tokenize(model.tokenizer, z)
        (v,) = model.velocity_tokens([x], t, {"txt": captions}, torch.zeros(len(captions), dtype=torch.bool))
        return untokenize(model.tokenizer, x.with_x(v))

    together = velocity(z, t, CAPTIONS)
    for i in range(4):
        torch.testing.assert_close(together[i], velocity(z[i : i + 1], t[i : i + 1], CAPTIONS[i : i + 1])[0],
                                   atol=1e-5, rtol=1e-5)


def test_dropped_captions_use_the_empty_caption(pretrained) -> None:
    model = latent_flow(pretrained)
    drop = torch.tensor([True, False, True, False])
    ctx, pooled = model.cond({"txt": CAPTIONS}, drop)
    null_ctx, null_pooled = model.cond({"txt": [""] * 4}, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(ctx[0], null_ctx[0])
    torch.testing.assert_close(pooled[2], null_pooled[2])
    assert ctx[1].shape[0] != ctx[0].shape[0]  # the kept caption keeps its own tokens


def test_cached_embeddings_of_other_encoders_are_refused_in_one_line_before_the_step(pretrained) -> None:
    """Embeddings cached by other text encoders (here: the first encoder's only) are refused where conditions are
    checked (on the host, as a batch moves to the device; once per sampling run), not inside the forward."""
    import pytest

    model = latent_flow(pretrained)
    good = cached_batch(model, torch.rand(4, 3, 16, 16) * 2 - 1, CAPTIONS)
    model.transfer_batch_to_device(good, torch.device("cpu"), 0)
    bad = {**good, "txt_tokens": [per_caption[:1] for per_caption in good["txt_tokens"]]}
    words = f"cached caption embeddings have token widths [{model.cond.text.token_dims[0]}] and a pooled width"
    for check in (lambda: model.transfer_batch_to_device(bad, torch.device("cpu"), 0),
                  lambda: model.generate({key: bad[key] for key in ("txt", "txt_tokens", "txt_pooled")}, 4)):
        with pytest.raises(ValueError, match=re.escape(words)) as info:
            check()
        assert "\n" not in str(info.value) and "--text-encoder list, in the same order" in str(info.value)


def test_checkpoint_keeps_folders_and_fingerprints_not_pretrained_weights(pretrained, tmp_path) -> None:
    model = latent_flow(pretrained)
    names = set(model.state_dict())
    assert {k for k in names if k.startswith("codecs.")} == {"codecs.0.latent_mean", "codecs.0.latent_std"}
    assert not any("text" in k and "proj" not in k and "pooled" not in k for k in names if k.startswith("cond."))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(dict(model.named_parameters()))
    checkpoint = {"hyper_parameters": {
        "codec": {"class_path": "models.codecs.pretrained.PretrainedAutoencoder",
                  "init_args": {"path": str(pretrained["kl"]), "subfolder": "vae", "stats": "gone.json"}},
        "conditioning": {"class_path": "models.conditioning.PretrainedText",
                         "init_args": {"encoders": [{"path": str(pretrained["t5"])}, {"path": str(pretrained["sd3"])}]}},
    }}
    model.on_save_checkpoint(checkpoint)
    hp = checkpoint["hyper_parameters"]
    assert hp["codec"]["init_args"]["fingerprint"] == model.codec.fingerprint and hp["codec"]["init_args"]["stats"] is None
    assert [e["fingerprint"] for e in hp["conditioning"]["init_args"]["encoders"]] == model.cond.fingerprints
    reloaded = TextEncoders([TextEncoderSpec(str(pretrained["t5"]), fingerprint=model.cond.fingerprints[0])])  # checks
    assert reloaded.fingerprints[0] == model.cond.fingerprints[0]


def test_cached_latents_of_any_size_are_cut_to_whole_patches(pretrained) -> None:
    """A latent side or frame count short of a whole patch (an image of odd size through the codec) is
    cropped like a codec's output, not a crash."""
    model = latent_flow(pretrained)
    odd = [torch.randn(4, 9, 8), torch.randn(4, 6, 11)]  # two samples of other sizes: packed
    (z,) = model.latents({"x_latent": odd})
    assert [tuple(t.shape) for t in z] == [(4, 8, 8), (4, 6, 10)]
    assert torch.isfinite(model.loss({"x_latent": odd, "txt": CAPTIONS[:2]}))


def test_cached_latents_check_the_shards_manifest_against_the_model(tmp_path: Path) -> None:
    import json

    import pytest

    from datamodules.latents import CachedLatents
    from datamodules.media.spec import MediaSpec

    (tmp_path / "manifest.json").write_text(json.dumps({
        "autoencoder": {"fingerprint": "aaa-bbb"}, "text_encoders": [{"fingerprint": "t1"}, {"fingerprint": "t2"}],
        "options": {"fps": 8}}))
    shards = [str(tmp_path / "x.tar")]
    ok = CachedLatents(text=True)
    ok.follow(MediaSpec(fps=8, made_with={"autoencoder": "aaa-bbb", "text_encoders": ["t1", "t2"]}))
    ok.check_shards(shards)
    for made_with, fps, words in (({"autoencoder": "ccc-ddd"}, 8, "autoencoder aaa-bbb"),
                                  ({"text_encoders": ["t2", "t1"]}, 8, "text_encoders ['t1', 't2']"),
                                  ({}, 16, "fps=8")):
        t = CachedLatents()
        t.follow(MediaSpec(fps=fps, made_with=made_with))
        with pytest.raises(ValueError, match=re.escape(words)):
            t.check_shards(shards)
    # the encoder of the cache and the model name a stream's autoencoder by one map
    from datamodules.media.spec import by_autoencoder_name

    assert by_autoencoder_name({"x": "f1", "audio": "f2"}) == {"autoencoder": "f1", "audio_autoencoder": "f2"}
    with pytest.raises(ValueError, match="stream 'depth': no latent-cache name for its autoencoder"):
        by_autoencoder_name({"depth": "f3"})


def test_sampling_encodes_the_captions_once(pretrained, monkeypatch) -> None:
    """The ODE calls the model at every step, twice with guidance: the text encoders run once per sampling run,
    and the samples equal those from captions encoded beforehand (the cached form)."""
    model = latent_flow(pretrained).eval()
    calls = []
    encode = model.cond.text.encode
    monkeypatch.setattr(model.cond.text, "encode", lambda captions: calls.append(captions) or encode(captions))
    live = model.generate({"txt": CAPTIONS[:2]}, 2, steps=3, cfg_scale=3.0, seed=1)
    assert len(calls) <= 2  # the captions once (and the empty caption once, for the null condition)
    cached = model.generate(model.cond.prepare({"txt": CAPTIONS[:2]}), 2, steps=3, cfg_scale=3.0, seed=1)
    torch.testing.assert_close(live, cached)
