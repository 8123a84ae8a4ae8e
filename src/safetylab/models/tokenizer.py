"""The world's word-level tokenizer, trained with Hugging Face ``tokenizers``."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<user>", "<assistant>", "<eos>")


def train_tokenizer(lines: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level vocabulary over whitespace-separated words; specials first (``<pad>`` is id 0).

    Every letter a–z is added too, so spaced-out words ("h u r t") always tokenize.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency)
    letters = [" ".join("abcdefghijklmnopqrstuvwxyz")]
    specials = set(SPECIAL_TOKENS)
    # The trainer numbers special tokens itself; left in the text, they would be counted twice.
    words = (" ".join(w for w in line.split() if w not in specials) for line in lines)
    tokenizer.train_from_iterator([*words, *letters], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        additional_special_tokens=["<user>", "<assistant>"],
    )
