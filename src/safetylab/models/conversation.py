"""The one conversation encoder: ``(prompt, response)`` → token ids, through the tokenizer's chat template.

SFT, reward models (causal backbones), DPO, PPO/RLOO, log-probs and KL, and sampling all call
:func:`encode_conversation`, so a model sees one conversation as the same tokens in every stage, and
a real Hugging Face chat model sees the format it was trained on:

- the prompt's ids are the template applied to ``[user: prompt]`` with ``add_generation_prompt=True``:
  what sampling feeds the model;
- the response's ids are the rest of the ids of ``[user: prompt, assistant: response]``, through the
  template's last eos token. The template must end the assistant turn with the tokenizer's eos token
  (sampling stops there); what a template writes after it (ChatML's newline after ``<|im_end|>``) is
  not part of the response, as a sampled response never holds it;
- where the whole conversation's ids do not begin with the prompt's (a tokenizer that merges across the
  boundary), the response's ids are the rest of the conversation's text tokenized alone, so the prompt
  is still exactly what sampling sees (TRL's DPO splits the same way).

A tokenizer without a chat template is an error naming it and saying how to set one, except a world
tokenizer saved before tokenizers carried one (:func:`chat_template`), which gets the world's.
"""

from __future__ import annotations

from collections.abc import Sequence

from safetylab.core.errors import SafetylabError
from safetylab.models.tokenizer import WORLD_CHAT_TEMPLATE, is_world_tokenizer


def chat_template(tokenizer) -> str:
    """``tokenizer.chat_template``; for a world tokenizer that has none (saved before tokenizers carried
    one), :data:`~safetylab.models.tokenizer.WORLD_CHAT_TEMPLATE`, the format it was trained on; for
    any other tokenizer without one, an error saying how to set it."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if template:
        return template
    if is_world_tokenizer(tokenizer):
        return WORLD_CHAT_TEMPLATE
    raise SafetylabError(
        f"tokenizer {_name(tokenizer)!r} has no chat template, so there is no telling how it writes a "
        "conversation; set tokenizer.chat_template to a Jinja template whose assistant turn ends with its eos token "
        f"{tokenizer.eos_token!r} (a chat model's own, or safetylab.models.tokenizer.WORLD_CHAT_TEMPLATE for the "
        "world's format) and save it with the model")


def render_conversation(tokenizer, prompt: str, response: str | None = None, template: str | None = None) -> str:
    """The text of ``[user: prompt]`` with the generation prompt (``response`` None), or of
    ``[user: prompt, assistant: response]``, in ``template`` (default: :func:`chat_template`)."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, chat_template=template or chat_template(tokenizer),
                                         add_generation_prompt=response is None, tokenize=False)


def encode_conversation(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one conversation, as the module docstring says: the prompt
    through the generation prompt, then the response through its closing eos token (``[]`` without a
    response). Nothing is cut; callers that need a length limit cut the response side."""
    prompt_ids, responses = encode_responses(tokenizer, prompt, [] if response is None else [response])
    return prompt_ids, responses[0] if responses else []


def encode_responses(tokenizer, prompt: str, responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """:func:`encode_conversation` of one prompt and several responses (DPO's chosen and rejected):
    ``(prompt_ids, [response_ids, …])``, the prompt written and tokenized once."""
    template = chat_template(tokenizer)
    prompt_text = render_conversation(tokenizer, prompt, None, template)
    texts = [render_conversation(tokenizer, prompt, response, template) for response in responses]
    prompt_ids = _ids(tokenizer, prompt_text)
    return prompt_ids, [_response_ids(tokenizer, prompt_text, prompt_ids, text, _ids(tokenizer, text))
                        for text in texts]


def _response_ids(tokenizer, prompt_text: str, prompt_ids: list[int], text: str, ids: list[int]) -> list[int]:
    """The ids after the prompt's in a whole conversation's ``ids`` (``text``), through the last eos."""
    if ids[:len(prompt_ids)] == prompt_ids:
        rest = ids[len(prompt_ids):]
    elif text.startswith(prompt_text):  # the tokenizer merged across the boundary: the rest's text alone
        rest = _ids(tokenizer, text[len(prompt_text):])
    else:
        raise SafetylabError(f"tokenizer {_name(tokenizer)!r}: its chat template writes the prompt "
                             f"{prompt_text!r} differently alone than before a response ({text!r}); expected a "
                             "template whose generation prompt is the start of the conversation")
    eos = tokenizer.eos_token_id
    if eos not in rest:
        raise SafetylabError(f"tokenizer {_name(tokenizer)!r}: its chat template does not end the assistant "
                             f"turn with the eos token {tokenizer.eos_token!r} (the response was written as "
                             f"{text[len(prompt_text):]!r}); sampling stops at eos, so the template must write it")
    end = len(rest) - rest[::-1].index(eos)
    return rest[:end]


def _ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids, as ``apply_chat_template`` tokenizes what it renders (one text at a time: a batch
    call costs a thread pool's start-up on each of these short texts)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
