"""Tokenizer loading and prompt encoding rules shared by the backends that own a tokenizer.

Rule for prompts: a text prompt is encoded the way `tokenizer(text)` does by default (special tokens
such as BOS added), except that a prompt which already starts with the BOS token's text (as some chat
templates render it) does not get a second BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from terse.errors import InvalidRequestError, ModelLoadError


def load_tokenizer(path_or_name: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory or hub name, with an error that says what to do."""
    try:
        tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(path_or_name))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load a tokenizer from {str(path_or_name)!r}: {e}. Give a local model directory "
            f"(with tokenizer.json / tokenizer_config.json) or a hub name available offline"
        ) from e
    return tok


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: special tokens as `tokenizer(text)` adds them, never a doubled BOS."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    ids: list[int] = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    return ids


def encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a text with no special tokens added."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Raise `InvalidRequestError` (naming `param`) unless every id is an int in [0, vocab_size).

    Tokenizers fail on such ids with overflow errors, or decode them to nothing, and a model would
    index past its embedding table.
    """
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); send ids the "
            f"model's tokenizer produced (POST /tokenize)",
            param=param,
        )


def context_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What an empty prefix is conditioned on when scoring: [BOS] if the tokenizer adds one, else []."""
    with_special: list[int] = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = encode_plain(tokenizer, "x")
    bos = tokenizer.bos_token_id
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return [bos]
    return []


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, config: Any) -> frozenset[int]:
    """Every id that ends generation: the model config's eos_token_id(s) and the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def render_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Any, tools: Sequence[Any] = ()) -> str:
    """Apply the tokenizer's chat template with the generation prompt (and `tools`, given to the template
    as its `tools` variable when there are some); a clear error when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            "this model's tokenizer has no chat template; render the prompt yourself and call submit() "
            "with text, or add a chat_template to tokenizer_config.json"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tools=[dict(t) for t in tools] or None, tokenize=False, add_generation_prompt=True
    )
    return str(text)


def num_added_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Special tokens `encode_prompt` adds to the `encode_plain` ids of `text`: what `tokenizer(text)`
    adds by default (BOS, for most models), 0 for a text that already starts with BOS."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return 0
    return int(tokenizer.num_special_tokens_to_add(pair=False))
