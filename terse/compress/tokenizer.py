"""The target tokenizer: the tokenizer the budget is counted in, with token offsets when it has them.

Compression measures its budget in the target model's tokenizer. With offsets (a Rust `tokenizers`
tokenizer, as every Hugging Face fast tokenizer holds) each context is tokenized once and every
count the stages need is derived from that one tokenization (see `analysis.py`); without offsets
(a bare `str -> int` counter, a remote `/tokenize`) the stages measure texts as they go.

    TargetTokenizer            count(text), spans(text) -> token character spans or None
      FastTokenizerTarget      a `tokenizers.Tokenizer` (or a transformers fast tokenizer): offsets
      CounterTarget            any `str -> int` counter (a Backend's count_tokens): no offsets
      WordCountTarget          words as split by `words.split_words`: the stated fallback without a model

`target_tokenizer_of(x)` turns what callers pass (a Backend, a counter, a tokenizer) into one;
`load_target_tokenizer(name_or_path)` loads one by model directory or hub name (offline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from terse.errors import ConfigError

TokenSpans = list[tuple[int, int]]

# Probes that must count alike through a backend's own counter and the Rust encoder before the
# encoder's offsets are trusted: leading/trailing spaces, newlines, digits, CJK, emoji.
_PROBES = (" Hello,  world!\n\nNew line 1958 ", "北京大学成立于一九五八年。", "naïve café — 42% 🙂 x\ty")


@runtime_checkable
class TargetTokenizer(Protocol):
    """Counts tokens of the target model's tokenizer (no special tokens added).

    `spans(text)` gives each token's (start, end) character span in `text`, in order, with
    `len(spans(text)) == count(text)`; spans may overlap (a character split over byte tokens) or be
    empty (tokens carrying no text). It returns None when this tokenizer has no offsets.
    """

    def count(self, text: str) -> int: ...

    def spans(self, text: str) -> TokenSpans | None: ...

    def count_many(self, texts: Sequence[str]) -> list[int]: ...


class FastTokenizerTarget:
    """A Rust `tokenizers.Tokenizer`: counts and offsets in one call. Picklable (for worker processes).

    It encodes with a private copy of the tokenizer, so its callers never contend with the owner's
    other users (an engine serialises its own tokenizer's use behind a lock)."""

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        rust = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not (hasattr(rust, "encode") and hasattr(rust, "encode_batch") and hasattr(rust, "to_str")):
            raise ConfigError(f"{tokenizer!r} is not a fast tokenizer (a tokenizers.Tokenizer or a transformers "
                              f"PreTrainedTokenizerFast); wrap its counter with CounterTarget instead")
        from tokenizers import Tokenizer

        self._rust = Tokenizer.from_str(rust.to_str())
        self._rust.no_truncation()  # counts are of the whole text, whatever the owner last configured
        self._rust.no_padding()
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or "tokenizer")

    def count(self, text: str) -> int:
        return len(self._rust.encode(text, add_special_tokens=False).ids) if text else 0

    def spans(self, text: str) -> TokenSpans:
        if not text:
            return []
        return list(self._rust.encode(text, add_special_tokens=False).offsets)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self._rust.encode_batch(list(texts), add_special_tokens=False)]


class CounterTarget:
    """Any `str -> int` counter (no offsets: the stages measure as they go)."""

    def __init__(self, counter: Callable[[str], int], name: str = "counter") -> None:
        self._counter = counter
        self.name = name

    def count(self, text: str) -> int:
        return self._counter(text) if text else 0

    def spans(self, text: str) -> TokenSpans | None:
        return None

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]


class WordCountTarget:
    """Counts words (`words.split_words`) instead of tokens: an approximation for use without any
    model or tokenizer, which callers must report as such. One "token" per word."""

    name = "words (estimate)"

    def count(self, text: str) -> int:
        from terse.compress.words import split_words

        return len(split_words(text))

    def spans(self, text: str) -> TokenSpans:
        from terse.compress.words import split_words

        return [(w.start, w.end) for w in split_words(text)]

    def count_many(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]


def target_tokenizer_of(target: Any, *, probe_counter: Callable[[str], int] | None = None) -> TargetTokenizer:
    """A `TargetTokenizer` for what a caller passes: a TargetTokenizer, a Backend (its own tokenizer's
    offsets when it holds a fast tokenizer whose counts agree with `count_tokens`, else its counter),
    a fast tokenizer, or a `str -> int` counter."""
    if isinstance(target, FastTokenizerTarget | CounterTarget | WordCountTarget):
        return target
    if _is_backend(target):
        # only plain attributes are read: a remote backend's properties (model name, window, tokenizer
        # strategy) may ask its server, and an unreachable server must fail where it is first used
        inner = vars(target).get("tokenizer")
        if inner is not None and hasattr(inner, "backend_tokenizer"):
            fast = FastTokenizerTarget(inner)
            if _agrees(fast, target.count_tokens):
                return fast
        return CounterTarget(target.count_tokens, name=type(target).__name__)
    if hasattr(target, "backend_tokenizer") or (hasattr(target, "encode_batch") and hasattr(target, "get_vocab")):
        fast = FastTokenizerTarget(target)
        if probe_counter is not None and not _agrees(fast, probe_counter):
            return CounterTarget(probe_counter)
        return fast
    if isinstance(target, TargetTokenizer):
        return target
    if callable(target):
        return CounterTarget(target)
    raise ConfigError(f"target_tokenizer={target!r} must be a Backend, a tokenizer, a str -> int callable, or None")


def load_target_tokenizer(name_or_path: str) -> TargetTokenizer:
    """The fast tokenizer of a model directory or hub name (offline cache), for counting budgets.

    Raises `ModelLoadError` naming the path when it cannot be loaded; `ConfigError` when the model
    has only a slow (Python) tokenizer, which gives no offsets.
    """
    from terse.backend.tokenization import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ConfigError(f"the tokenizer of {name_or_path!r} is a slow (Python) tokenizer; give a model "
                          f"with a tokenizer.json (a fast tokenizer)")
    return FastTokenizerTarget(tokenizer, name=name_or_path)


def _is_backend(target: Any) -> bool:
    """A Backend (or a wrapper delegating to one), told by its methods: a runtime Protocol check
    would evaluate its properties, which a remote backend answers by asking its server."""
    return callable(getattr(target, "count_tokens", None)) and callable(getattr(target, "render_chat", None))


def _agrees(fast: FastTokenizerTarget, counter: Callable[[str], int]) -> bool:
    """Whether the Rust encoder counts the probes exactly as the backend does (some tokenizers add
    Python-side normalisation that the encoder alone would miss)."""
    try:
        return all(fast.count(p) == counter(p) for p in _PROBES)
    except Exception:  # a counter that cannot take a probe: do not trust the offsets
        return False
