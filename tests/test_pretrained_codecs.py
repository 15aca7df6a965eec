"""PretrainedAutoencoder against the diffusers models themselves, on tiny random instances saved to disk.

Each family is built tiny and random here, saved with ``save_pretrained`` and loaded back only
through our code; the reference is the same folder loaded with diffusers and called directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLLTXVideo, AutoencoderKLWan, AutoencoderOobleck
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from models.codecs.latent_stats import LatentStats, denormalise, normalise
from models.codecs.pretrained import PretrainedAutoencoder
from models.pretrained_files import check_fingerprint, folder_fingerprint
from tests.pretrained_models import WAN_MEAN, WAN_STD, save_autoencoders


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_autoencoders(tmp_path_factory.mktemp("autoencoders"))


def load(folders: dict[str, Path], name: str, **kwargs) -> PretrainedAutoencoder:
    return PretrainedAutoencoder(str(folders[name]), subfolder="vae" if name == "kl" else None, **kwargs)


def reference(folders: dict[str, Path], name: str) -> nn.Module:
    cls = {"kl": AutoencoderKL, "dc": AutoencoderDC, "wan": AutoencoderKLWan, "ltx": AutoencoderKLLTXVideo, "oobleck": AutoencoderOobleck}[name]
    return cls.from_pretrained(str(folders[name]), subfolder="vae" if name == "kl" else None).eval()


def per_channel(v: list[float], z: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=z.dtype).view(1, -1, *[1] * (z.ndim - 2))


# name, media shape, latent shape, the reference's normalised latent from its raw latent z
CASES = [
    ("kl", (2, 3, 16, 16), (2, 4, 8, 8), lambda m, z: (z - 0.1) * 1.5),
    ("dc", (2, 3, 16, 16), (2, 4, 8, 8), lambda m, z: z * 0.4),
    ("wan", (2, 3, 9, 16, 16), (2, 4, 3, 4, 4), lambda m, z: (z - per_channel(WAN_MEAN, z)) / per_channel(WAN_STD, z)),
    ("ltx", (2, 3, 9, 16, 16), (2, 4, 5, 4, 4),
     lambda m, z: (z - m.latents_mean.view(1, -1, 1, 1, 1)) * 0.5 / m.latents_std.view(1, -1, 1, 1, 1)),
    ("oobleck", (2, 256), (2, 4, 32), lambda m, z: z),
]


def model_input(name: str, x: torch.Tensor) -> torch.Tensor:
    return x[:, None].expand(-1, 2, -1) if name == "oobleck" else x  # mono -> the model's 2 channels


def model_output(name: str, y: torch.Tensor) -> torch.Tensor:
    return y.mean(dim=1) if name == "oobleck" else y


@pytest.mark.parametrize("name, shape, latent_shape, normalised", CASES, ids=[c[0] for c in CASES])
def test_encode_decode_equal_the_diffusers_model(folders, name, shape, latent_shape, normalised):
    codec, model = load(folders, name), reference(folders, name)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == latent_shape == codec.latent_shape_for(shape)
    with torch.no_grad():
        posterior = model.encode(model_input(name, x))
        raw = posterior.latent if name == "dc" else posterior.latent_dist.mode()
        assert_close(z, normalised(model, raw))
        assert_close(codec.decode(z), model_output(name, model.decode(raw).sample), atol=1e-5, rtol=1e-4)
    assert codec.decode(z).shape == shape
    assert_close(codec.denormalise(z), raw, atol=1e-5, rtol=1e-5)


def test_geometry_per_family(folders):
    got = {name: (c.latent_channels, c.spatial_factor, c.temporal_factor, c.hop) for name in folders for c in [load(folders, name)]}
    assert got == {"kl": (4, 2, 1, 1), "dc": (4, 2, 1, 1), "wan": (4, 4, 4, 1), "ltx": (4, 4, 2, 1), "oobleck": (4, 1, 1, 8)}


def test_inputs_are_cropped_to_whole_strides(folders):
    """Wan: 10 frames of 18x17 encode as the first 1 + 4k = 9 frames of 16x16; audio to whole hops."""
    wan = load(folders, "wan")
    clip = torch.rand(1, 3, 10, 18, 17) * 2 - 1
    assert wan.latent_shape_for(clip.shape) == (1, 4, 3, 4, 4)
    assert_close(wan.encode(clip), wan.encode(clip[:, :, :9, :16, :16]))
    audio = load(folders, "oobleck")
    wave = torch.rand(2, 260) * 2 - 1
    assert audio.latent_shape_for(wave.shape) == (2, 4, 32)
    assert_close(audio.encode(wave), audio.encode(wave[:, :256]))
    with pytest.raises(ValueError, match="at least hop=8"):
        audio.encode(wave[:, :7])


def test_posterior_sample_equals_diffusers_sample(folders):
    codec, model = load(folders, "kl", sample=True), reference(folders, "kl")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert_close(z, (raw - 0.1) * 1.5)
    assert not torch.allclose(z, load(folders, "kl").encode(x))  # not the mean
    with pytest.raises(ValueError, match="AutoencoderDC is deterministic"):
        load(folders, "dc", sample=True)


def test_bfloat16_weights_give_float32_latents(folders):
    codec, model = load(folders, "kl", dtype="bfloat16"), reference(folders, "kl").to(torch.bfloat16)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.dtype == torch.float32 and codec.autoencoder.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(z, (model.encode(x.bfloat16()).latent_dist.mode().float() - 0.1) * 1.5)
    with pytest.raises(ValueError, match="dtype='float8'; expected one of float32, bfloat16, float16"):
        load(folders, "kl", dtype="float8")


def test_slicing_and_tiling_switch_the_model(folders):
    codec = load(folders, "kl", slicing=True, tiling=True)
    assert codec.autoencoder.use_slicing and codec.autoencoder.use_tiling
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert_close(codec.encode(x), load(folders, "kl").encode(x))  # slicing is exact; tiles are larger than 16 pixels


def test_frozen_outside_state_dict_but_moved_by_the_parent(folders):
    codec = load(folders, "wan")
    parent = nn.ModuleDict({"codec": codec, "head": nn.Linear(2, 2)})
    assert all(not p.requires_grad for p in codec.autoencoder.parameters())
    assert not codec.autoencoder.training
    assert list(codec.parameters()) == []
    assert set(parent.state_dict()) == {"codec.latent_mean", "codec.latent_std", "head.weight", "head.bias"}
    parent.train()
    assert not codec.autoencoder.training  # train() does not reach it
    parent.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in codec.autoencoder.parameters())
    z = codec.encode(torch.rand(1, 3, 5, 8, 8, dtype=torch.float64))
    assert z.dtype == torch.float64 and z.shape == (1, 4, 2, 2, 2)


def test_normalisation_is_carried_by_the_checkpoint(folders):
    """The numbers used by encode/decode are persistent buffers: a restored state dict restores them."""
    codec = load(folders, "wan")
    assert codec.normalisation()["mean"] == pytest.approx(WAN_MEAN) and codec.normalisation()["std"] == pytest.approx(WAN_STD)
    assert codec.normalisation()["fingerprint"] == codec.fingerprint
    state = {k: v * 2 for k, v in codec.state_dict().items()}
    restored = load(folders, "wan")
    restored.load_state_dict(state)
    assert restored.normalisation()["std"] == pytest.approx([2 * s for s in WAN_STD])


def copy_with(folder: Path, dst: Path, edit) -> Path:
    shutil.copytree(folder, dst)
    edit(dst)
    return dst


def test_fingerprint_stable_and_names_what_changed(folders, tmp_path):
    folder = folders["dc"]
    assert load(folders, "dc").fingerprint == load(folders, "dc").fingerprint == folder_fingerprint(folder)
    check_fingerprint(str(folder), None, folder_fingerprint(folder))

    def one_weight(dst: Path) -> None:
        file = next(dst.glob("*.safetensors"))
        weights = load_file(file)
        key = min(weights)
        weights[key] = weights[key].clone()
        weights[key].view(-1)[0] += 1e-3
        save_file(weights, file, metadata={"format": "pt"})

    def config_edit(key: str, value: object):
        def edit(dst: Path) -> None:
            config = json.loads((dst / "config.json").read_text())
            (dst / "config.json").write_text(json.dumps({**config, key: value}))
        return edit

    expected = folder_fingerprint(folder)
    changed = copy_with(folder, tmp_path / "w", one_weight)
    with pytest.raises(ValueError, match=r"changed: weights differ") as error:
        check_fingerprint(str(changed), None, expected)
    assert str(changed) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"changed: config differ"):
        check_fingerprint(str(copy_with(folder, tmp_path / "c", config_edit("scaling_factor", 0.5))), None, expected)
    # the version that wrote the config is not part of it
    check_fingerprint(str(copy_with(folder, tmp_path / "v", config_edit("_diffusers_version", "9.9.9"))), None, expected)
    # the codec checks a recorded fingerprint itself (what a generator checkpoint passes back)
    assert PretrainedAutoencoder(str(folder), fingerprint=expected).fingerprint == expected
    with pytest.raises(ValueError, match=r"changed: weights differ"):
        PretrainedAutoencoder(str(changed), fingerprint=expected)


def test_missing_or_foreign_folder_is_one_line(folders, tmp_path):
    for call in (lambda: check_fingerprint(str(tmp_path / "gone"), "vae", "0" * 12 + "-" + "0" * 12),
                 lambda: PretrainedAutoencoder(str(tmp_path / "gone"), subfolder="vae")):
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert str(tmp_path / "gone" / "vae") in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds 'UNet2DModel'; expected one of AutoencoderKL"):
        PretrainedAutoencoder(str(tmp_path / "unet"))


# ---- latent statistics ----

def known_latents(mean: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, C, ...) float64 whose per-channel population mean and std are exactly ``mean`` and ``std``."""
    noise = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dims = [0, *range(2, len(shape))]
    noise = (noise - noise.mean(dim=dims, keepdim=True)) / noise.std(dim=dims, keepdim=True, correction=0)
    return noise * std.view(1, -1, *[1] * (len(shape) - 2)) + mean.view(1, -1, *[1] * (len(shape) - 2))


def test_latent_stats_closed_form_and_merge():
    mean, std = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.25, 4.0], dtype=torch.float64)
    z = known_latents(mean, std, (10, 3, 4, 5))
    whole = LatentStats()
    for chunk in z.split([1, 3, 6]):  # unequal batches
        whole.update(chunk.float() if chunk.shape[0] == 1 else chunk)
    got_mean, got_std = whole.result()
    assert_close(got_mean, mean, atol=1e-7, rtol=0)  # float32 chunk: input rounding only
    assert_close(got_std, std, atol=1e-7, rtol=1e-7)
    first, second = LatentStats().update(z[:4]), LatentStats().update(z[4:])  # two ranks
    merged = first.merge(second)
    assert merged.count == whole.count == 10 * 4 * 5
    exact = LatentStats().update(z)
    assert_close(merged.result()[0], exact.result()[0], atol=1e-12, rtol=0)
    assert_close(merged.result()[1], exact.result()[1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="no latents"):
        LatentStats().result()


def test_latent_stats_channel_last_and_normalise_roundtrip():
    mean, std = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    z = known_latents(mean, std, (6, 2, 7)).movedim(1, -1)  # (B, L, C)
    stats = LatentStats(channel_dim=-1).update(z)
    assert_close(stats.result()[0], mean, atol=1e-12, rtol=0)
    z_norm = normalise(z, *stats.result(), channel_dim=-1)
    assert_close(z_norm.mean(dim=(0, 1)), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(z_norm.std(dim=(0, 1), correction=0), torch.ones(2, dtype=torch.float64))
    assert_close(denormalise(z_norm, *stats.result(), channel_dim=-1), z)


def test_stats_file_normalises_the_codec(folders, tmp_path):
    codec = load(folders, "kl")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    raw = codec.encode_raw(x)
    stats = LatentStats().update(raw)
    stats.save(str(tmp_path / "stats.json"), fingerprint=codec.fingerprint)
    loaded, fingerprint = LatentStats.load(str(tmp_path / "stats.json"))
    assert fingerprint == codec.fingerprint and loaded.count == stats.count
    assert_close(loaded.result()[1], stats.result()[1])
    measured = load(folders, "kl", stats=str(tmp_path / "stats.json"))
    z = measured.encode(x)
    dims = (0, 2, 3)
    assert_close(z.mean(dim=dims), torch.zeros(4), atol=1e-5, rtol=0)
    assert_close(z.std(dim=dims, correction=0), torch.ones(4), atol=1e-5, rtol=1e-5)
    assert measured.normalisation()["source"] == f"stats {tmp_path / 'stats.json'}"
    stats.save(str(tmp_path / "other.json"), fingerprint="0" * 12 + "-" + "0" * 12)
    with pytest.raises(ValueError, match="was measured with autoencoder 000000000000-000000000000"):
        load(folders, "kl", stats=str(tmp_path / "other.json"))
    LatentStats().update(torch.randn(2, 3, 5)).save(str(tmp_path / "three.json"))  # no fingerprint: only the size is checked
    with pytest.raises(ValueError, match="gives 3 means and 3 stds .*; expected 4 of each"):
        load(folders, "kl", stats=str(tmp_path / "three.json"))


def test_builds_from_a_class_path_config(folders):
    """What a LightningCLI YAML gives: class_path + init_args, checked against the typed signature."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(nn.Module, "codec")
    init_args = {"path": str(folders["kl"]), "subfolder": "vae", "dtype": "bfloat16", "slicing": True}
    config = parser.parse_object({"codec": {"class_path": "models.codecs.pretrained.PretrainedAutoencoder", "init_args": init_args}})
    codec = parser.instantiate(config).codec
    assert isinstance(codec, PretrainedAutoencoder) and codec.autoencoder.dtype == torch.bfloat16 and codec.autoencoder.use_slicing


def test_the_trainers_autocast_does_not_reach_the_frozen_autoencoder(folders):
    """Under bf16 autocast (a bf16-mixed run) the float32 autoencoder still encodes in float32: on-the-fly latents
    equal the float32 cache."""
    codec = load(folders, "kl")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = codec.encode_raw(x)
    torch.testing.assert_close(mixed, codec.encode_raw(x), rtol=0, atol=0)
