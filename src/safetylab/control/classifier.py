"""A small, fast text classifier for guard layers: hashed word and character n-grams and logistic regression.

Features are stateless — scikit-learn's ``HashingVectorizer`` of word 1–2-grams and of character 2–5-grams
within word boundaries (which survive the spacing and look-alike obfuscation of jailbreaks better than words
do), L2-normalised each — so the classifier is its weights alone: saved as safetensors with a JSON of its
settings, never pickled. Scikit-learn's ``LogisticRegression`` fits it. Scoring one text does not go through
scikit-learn's sparse matrices (0.7 ms a call, nearly all of it their set-up): :meth:`TextClassifier.score`
hashes the same n-grams with the same MurmurHash3 and sums their weights directly, remembering each word
n-gram's column and each word's character n-grams (which never cross a word boundary), about 16 µs a prompt,
equal to the sparse product to float rounding.

The score is the log-odds of the positive label (higher = more suspect, as every detector in safetylab).
"""

from __future__ import annotations

import json
import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.utils import murmurhash3_32

from safetylab.core.config import config_from_dict, require
from safetylab.core.errors import SafetylabError
from safetylab.core.io import atomic_write_text, read_json

FORMAT = "safetylab.text-classifier/1"
CONFIG, WEIGHTS = "classifier.json", "classifier.safetensors"
# what scoring remembers, bounded whatever the texts: n-gram -> column, and word -> its character n-grams' columns
# (words of up to 24 characters, at most 70 n-grams each): about 25 MB each at most
MEMO_NGRAMS, MEMO_WORDS, MEMO_WORD_CHARS = 2**18, 2**15, 24


@dataclass(frozen=True)
class TextClassifierConfig:
    """``n_features`` hash buckets per vectorizer (2^18 each), inverse regularisation ``c`` of the logistic
    regression, ``class_weight`` "balanced" (or None) for unequal classes; ``despace`` joins letters spaced
    out one by one ("m a k e" → "make", :func:`despace`) before the n-grams are taken."""

    n_features: int = 2**18
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    despace: bool = True
    c: float = 4.0
    class_weight: str | None = "balanced"
    max_iter: int = 1000

    def __post_init__(self):
        require(isinstance(self.n_features, int) and self.n_features >= 16, "n_features", "an integer >= 16",
                self.n_features)
        for name in ("word_ngrams", "char_ngrams"):
            lo, hi = getattr(self, name)
            require(1 <= lo <= hi, name, "a range (low, high) with 1 <= low <= high", getattr(self, name))
        require(self.c > 0, "c", "a number > 0", self.c)
        require(self.class_weight in (None, "balanced"), "class_weight", "'balanced' or null", self.class_weight)


class TextClassifier:
    """Log-odds of ``labels[1]`` for a text: ``weights`` over the hashed features of :func:`vectorizers`."""

    def __init__(self, config: TextClassifierConfig, weights: np.ndarray, bias: float,
                 labels: tuple[str, str] = ("benign", "harmful")):
        if weights.shape != (2 * config.n_features,):
            raise SafetylabError(f"text classifier: weights of shape {weights.shape}; expected "
                                 f"({2 * config.n_features},) for n_features {config.n_features}")
        self.config, self.weights, self.bias, self.labels = config, weights.astype(np.float32), float(bias), labels
        self._vectorizers = vectorizers(config)
        chars = self._vectorizers[1]
        self._preprocess, self._char_ngrams = chars.build_preprocessor(), chars.build_analyzer()
        self._columns: dict[str, int] = {}  # word n-gram -> weight index, as met
        self._words: dict[str, tuple[array, float]] = {}  # word -> its char n-grams' indices and weight
        self._weights = self.weights.astype(np.float64).tolist()

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        return features(self._vectorizers, texts)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) log-odds of the positive label: b + Σ_v Σ_g c_vg w[h_v(g)] / ‖c_v‖₂ over the vectorizers v, with
        c_vg the count of n-gram g and h_v its hashed column (``HashingVectorizer``'s, ``alternate_sign=False``,
        ``norm="l2"``)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise SafetylabError("text classifier: expected a list of strings")
        return np.array([self._score(text) for text in texts], dtype=np.float64)

    def _score(self, text: str) -> float:
        n, weights = self.config.n_features, self._weights
        words = self._preprocess(text).split()  # both vectorizers' tokens: runs of non-space
        columns = []  # one per word n-gram; colliding n-grams share a column, as in the matrix
        for gram in word_ngrams(words, *self.config.word_ngrams):
            column = self._columns.get(gram)
            columns.append(column if column is not None else
                           self._remember(self._columns, gram, column_of(gram, n)))
        total = self.bias + normalised_sum(columns, sum(weights[column] for column in columns))
        # char_wb n-grams never cross a word boundary: a text's are its words' together, each word's looked up once
        pieces, weighted = [], 0.0
        for word in words:
            entry = self._words.get(word)
            if entry is None:
                entry = self._char_entry(word)
                if len(word) <= MEMO_WORD_CHARS:
                    self._remember(self._words, word, entry, MEMO_WORDS)
            pieces.append(entry[0])
            weighted += entry[1]
        return total + normalised_sum(chain.from_iterable(pieces), weighted)

    def _char_entry(self, word: str) -> tuple[array, float]:
        """``word``'s character n-grams' weight indices (after the word n-grams' block), one per n-gram, and the
        sum of their weights."""
        n = self.config.n_features
        columns = array("l", [n + column_of(gram, n) for gram in self._char_ngrams(word)])
        return columns, sum(self._weights[column] for column in columns)

    @staticmethod
    def _remember(memo: dict, key: str, value, size: int = MEMO_NGRAMS):
        """``value``, remembered under ``key`` (a memo keeps at most ``size`` entries: full, it starts again)."""
        if len(memo) >= size:
            memo.clear()
        memo[key] = value
        return value

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``classifier.json`` and ``classifier.safetensors`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS}.tmp"
        save_file({"weights": torch.from_numpy(self.weights), "bias": torch.tensor([self.bias])}, str(tmp))
        os.replace(tmp, path / WEIGHTS)
        meta = {"format": FORMAT, "labels": list(self.labels), "config": asdict(self.config)}
        atomic_write_text(path / CONFIG, json.dumps(meta, indent=2) + "\n")
        return path


def normalised_sum(columns: Iterable[int], weighted: float) -> float:
    """One vectorizer's term of the score, ``weighted`` / ‖c‖₂: ``weighted`` = Σ c w[column] (linear, so summed
    n-gram by n-gram), c the count of each column among ``columns`` (``norm="l2"``); 0 for no columns."""
    norm = math.hypot(*Counter(columns).values())
    return weighted / norm if norm else 0.0


def word_ngrams(tokens: Sequence[str], low: int, high: int) -> list[str]:
    """The ``low``- to ``high``-grams of ``tokens``, each joined by one space (as the word vectorizer forms them)."""
    return [" ".join(tokens[i:i + k]) for k in range(low, high + 1) for i in range(len(tokens) - k + 1)]


def column_of(gram: str, n_features: int) -> int:
    """``HashingVectorizer``'s column of an n-gram: its signed MurmurHash3 (seed 0), absolute, modulo
    ``n_features`` (``alternate_sign=False``)."""
    h = murmurhash3_32(gram, 0)
    return (2**31 - 1 - (n_features - 1)) % n_features if h == -(2**31) else abs(h) % n_features


_SPACED = re.compile(r"(?<!\S)(?:\S ){2,}\S(?!\S)")


def despace(text: str) -> str:
    """``text`` lower-cased, with runs of three or more single characters separated by single spaces joined
    into one word: the spacing obfuscation of jailbreaks undone."""
    return _SPACED.sub(lambda m: m.group(0).replace(" ", ""), text.lower())


def vectorizers(config: TextClassifierConfig) -> tuple[HashingVectorizer, HashingVectorizer]:
    """The word and character-n-gram hashing vectorizers (stateless: nothing to fit or save)."""
    common = {"n_features": config.n_features, "alternate_sign": False, "lowercase": True,
              "preprocessor": despace if config.despace else None}
    return (HashingVectorizer(analyzer="word", ngram_range=config.word_ngrams, token_pattern=r"\S+", **common),
            HashingVectorizer(analyzer="char_wb", ngram_range=config.char_ngrams, **common))


def features(vectorizers: Sequence[HashingVectorizer], texts: Sequence[str]) -> sp.csr_matrix:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SafetylabError("text classifier: expected a list of strings")
    return sp.hstack([v.transform(texts) for v in vectorizers], format="csr")


def fit_text_classifier(texts: Sequence[str], labels: Sequence[int],
                        config: TextClassifierConfig = TextClassifierConfig(),
                        label_names: tuple[str, str] = ("benign", "harmful")) -> TextClassifier:
    """Fit the logistic regression on ``texts`` with 0/1 ``labels`` (both present)."""
    y = np.asarray(labels)
    if len(y) != len(texts) or not set(np.unique(y)) == {0, 1}:
        raise SafetylabError(f"fit_text_classifier: expected one 0/1 label per text with both labels present, got "
                             f"{len(y)} labels ({sorted(set(y.tolist()))}) for {len(texts)} texts")
    x = features(vectorizers(config), texts)
    model = LogisticRegression(C=config.c, class_weight=config.class_weight, max_iter=config.max_iter,
                               solver="liblinear")
    model.fit(x, y)
    return TextClassifier(config, model.coef_[0], model.intercept_[0], label_names)


def load_text_classifier(path: str | os.PathLike) -> TextClassifier:
    """The classifier saved in directory ``path`` by :meth:`TextClassifier.save`."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise SafetylabError(f"{path}: not a text classifier (expected {CONFIG} and {WEIGHTS})")
    meta = read_json(path / CONFIG)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SafetylabError(f"{path / CONFIG}: not a text classifier file (expected format {FORMAT!r})")
    config = config_from_dict(TextClassifierConfig, meta.get("config"), where=str(path / CONFIG))
    tensors = load_file(str(path / WEIGHTS))
    return TextClassifier(config, tensors["weights"].numpy(), float(tensors["bias"][0]), tuple(meta["labels"]))


__all__ = ["TextClassifier", "TextClassifierConfig", "fit_text_classifier", "load_text_classifier"]
