"""Unit tests of the text task (common/tasks/text.py, common/models/text.py): the corpus, the tokenizer and
all-MiniLM-L6-v2 load from the packaged files with the network cut off; the student is >= 10x smaller."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from client.site import load_site
from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.models.registry import build_model, count_parameters, head_parameters
from common.models.text import minilm_path, tokenizer
from common.node_config import NodeConfig
from common.tasks.registry import load_split
from common.tasks.samples import TextSet
from common.tasks.text import read_bbc_news

BBC = {"dataset": "bbc-news", "public-size": 600, "num-clients": 4, "min-clients": 3, "partitioner": "iid",
       "teacher-models": "minilm,bert-small", "student-model": "bert-tiny", "max-seq-len": 32}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails, and the HuggingFace libraries are told they are offline."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    with torch.random.fork_rng():
        yield


def test_tokenizer_loads_offline_from_the_packaged_files(no_network: None) -> None:
    # Prepare
    tokenizer.cache_clear()

    # Execute
    ids = tokenizer()("Hello world", padding="max_length", max_length=8, truncation=True)["input_ids"]

    # Assert: [CLS] hello world [SEP], padded with 0, from MiniLM's 30,522-token vocabulary
    assert ids == [101, 7592, 2088, 102, 0, 0, 0, 0]
    assert tokenizer().vocab_size == 30_522
    assert (minilm_path() / "vocab.txt").is_file()


def test_minilm_loads_offline_with_its_pretrained_weights(no_network: None) -> None:
    # Execute
    model = build_model("minilm", 5, (32,), seed=0)
    ids = torch.from_numpy(load_split("bbc-news", "", 600, 42, max_seq_len=32).public.inputs[:4].copy())
    model.eval()
    with torch.inference_mode():
        logits = model(ids)

    # Assert: the encoder holds the packaged weights; a fresh head on top; finite logits
    saved = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in saved if k.endswith("encoder.layer.5.output.dense.weight"))
    torch.testing.assert_close(model.features.encoder.layer[5].output.dense.weight, saved[key])
    assert 22_000_000 < count_parameters(model) < 23_000_000
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    assert model.lr_multiplier < 1.0
    assert not model.features.embeddings.word_embeddings.weight.requires_grad


def test_student_is_at_least_10x_smaller_than_minilm() -> None:
    # Execute
    sizes = {name: count_parameters(build_model(name, 5, (64,), seed=0)) for name in ("minilm", "bert-small", "bert-tiny")}

    # Assert
    assert sizes["minilm"] >= 10 * sizes["bert-tiny"]
    assert sizes["minilm"] > sizes["bert-small"] > sizes["bert-tiny"]
    student = build_model("bert-tiny", 5, (64,), seed=0)
    assert head_parameters(student)[-1].shape == (5,)


def test_bbc_news_reads_in_sorted_order_and_splits() -> None:
    # Execute
    texts, labels = read_bbc_news()
    split = load_split("bbc-news", "", 600, 42, max_seq_len=32)  # 32 as the other text tests: one tokenization (~2 s)

    # Assert
    assert len(texts) == 2_225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert (len(split.public), len(split.test), len(split.private)) == (600, 445, 1_180)
    assert split.task == "text" and split.public.inputs.shape == (600, 32)
    assert split.public.inputs.dtype == np.int64 and (split.public.inputs[:, 0] == 101).all()


def test_own_texts_are_tokenized_like_the_public_set(tmp_path: Path) -> None:
    # Prepare: an institution's JSONL, labels by name and by index
    cfg = RunConfig.from_run_config({**default_run_config(), **BBC})
    rows = [{"text": "Shares fell sharply on Monday.", "label": "business"}, {"text": "The striker scored twice.", "label": 3}]
    (tmp_path / "news.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    # Execute
    site = load_site(cfg, NodeConfig(data_path=str(tmp_path / "news.jsonl")), RecordDict())

    # Assert
    assert isinstance(site.private, TextSet)
    assert site.private.labels.tolist() == [0, 3]
    assert site.private.inputs.shape == (2, 32) and site.private.inputs[0, 0] == 101
    assert site.private.inputs[0].tolist()[:3] == tokenizer()("Shares fell")["input_ids"][:3]


def test_image_models_are_refused_for_texts() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="model 'cnn-student' does not fit dataset bbc-news \\(text task\\); "
                                          "models for it: bert-small, bert-tiny, minilm"):
        RunConfig.from_run_config({**default_run_config(), **BBC, "student-model": "cnn-student"})
