"""The world's word-level tokenizer, trained with Hugging Face ``tokenizers``, and its chat template."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<user>", "<assistant>", "<eos>")

# The world's conversation format, ``<user> {prompt} <assistant> {response} <eos>`` (the text
# ``safetylab.world.world.chat`` writes), as a Hugging Face chat template: a user turn, an assistant turn
# ended by the eos token, and `` <assistant>`` as the generation prompt. Later turns follow with one space.
WORLD_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ('' if loop.first else ' ') + '<user> ' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' <assistant> ' + message['content'] + ' <eos>' -}}"
    "{%- else -%}"
    "{{- raise_exception('the world chat format has user and assistant turns only, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' <assistant>' -}}{%- endif -%}"
)


def train_tokenizer(lines: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level vocabulary over whitespace-separated words; specials first (``<pad>`` is id 0),
    and the world's chat template (:data:`WORLD_CHAT_TEMPLATE`, saved with ``save_pretrained``).

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
        chat_template=WORLD_CHAT_TEMPLATE,
    )


def is_world_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is one :func:`train_tokenizer` made: its special tokens are the world's."""
    return tokenizer.eos_token == "<eos>" and set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def adopt_world_template(tokenizer):
    """Give a world tokenizer saved before tokenizers carried a chat template (no ``chat_template`` in
    its ``tokenizer_config.json``) the world's, which encodes as those models were trained; any other
    tokenizer is left as it is. Returns ``tokenizer``."""
    if getattr(tokenizer, "chat_template", None) is None and is_world_tokenizer(tokenizer):
        tokenizer.chat_template = WORLD_CHAT_TEMPLATE
    return tokenizer
