"""Data for training the reference model: tokenizer training text and tokenized example streams.

Used by bench/train_reference.py; runs on CPU worker processes so the GPU never waits for data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terse.synth.examples import Example, world_examples
from terse.synth.tokenizer import train_tokenizer

_TOKENIZER = None


@dataclass(frozen=True)
class Tokenized:
    token_ids: np.ndarray
    """[seq_len] int32, BOS first."""
    loss_weights: np.ndarray
    """[seq_len] float32; weight of predicting token i (0 for prompt tokens)."""
    kind: str


def tokenizer_corpus(num_worlds: int = 400) -> Iterator[str]:
    """Train-split text only (never validation or test): every document of `num_worlds` worlds once,
    and whole examples of a few worlds for the prompt formats. Documents appear once each so that
    merges follow English and name syllables, not the particular names of a few worlds."""
    from terse.synth.render import render_documents
    from terse.synth.world import build_world

    for w in range(num_worlds):
        for d in render_documents(build_world(1_000_000_000 + w, "train")):
            yield d.text
    for w in range(8):
        for e in world_examples(1_000_000_000 + w):
            yield e.prompt + e.completion


def build_tokenizer(out_dir: Path, vocab_size: int = 4096, *, isolate_spaces: bool = True) -> None:
    """Train the reference tokenizer (every space its own token, as shipped) on train-split text and save
    it in `out_dir`."""
    tok = train_tokenizer(tokenizer_corpus(), vocab_size, isolate_spaces=isolate_spaces)
    tok.save_pretrained(out_dir)  # type: ignore[attr-defined]


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


ANSWER_WEIGHT = 1.0
"""Loss weight tag of assistant (answer) tokens."""
LM_WEIGHT = 0.5
"""Loss weight tag of prompt and plain-text tokens (language modelling; weighted by --lm-weight)."""


def tokenize_example(tok: object, e: Example) -> Tokenized:
    """BOS + prompt (LM tag) + completion + EOS (answer tag); plain text: BOS + text + EOS, all LM tag.

    Prompt and completion are encoded apart: the prompt ends with "\\n", a pre-token boundary of the
    byte-level pre-tokenizer, so this equals encoding the joined text, as a backend does at inference.
    """
    eos = tok.eos_token_id  # type: ignore[attr-defined]
    completion_ids = tok(e.completion, add_special_tokens=False)["input_ids"] + [eos]  # type: ignore[operator]
    prompt_ids = tok(e.prompt)["input_ids"]  # type: ignore[operator]  # BOS prepended
    if not e.prompt:
        prompt_ids = prompt_ids[:1]
    ids = np.asarray(prompt_ids + completion_ids, dtype=np.int32)
    weights = np.full(len(ids), LM_WEIGHT, dtype=np.float32)
    if e.prompt:
        weights[len(prompt_ids) :] = ANSWER_WEIGHT
    weights[0] = 0.0  # nothing predicts BOS
    return Tokenized(ids, weights, e.kind)


def copy_example(tok: object, rng: random.Random, max_tokens: int) -> Tokenized:
    """BOS, 8..~max_tokens/3 random tokens, EOS, the same tokens again (trained, answer tag).

    Pure repetition of meaningless tokens: the signal that forms induction (copying) heads soonest,
    which every doc-QA answer then reuses.
    """
    vocab = len(tok)  # type: ignore[arg-type]
    specials = set(tok.all_special_ids)  # type: ignore[attr-defined]
    n = rng.randint(8, max(8, min(200, max_tokens // 3)))
    seq = []
    while len(seq) < n:
        t = rng.randrange(vocab)
        if t not in specials:
            seq.append(t)
    ids = np.asarray([tok.bos_token_id, *seq, tok.eos_token_id, *seq], dtype=np.int32)  # type: ignore[attr-defined]
    weights = np.full(len(ids), LM_WEIGHT, dtype=np.float32)
    weights[: n + 2] = 0.0  # BOS, the first copy and EOS are unpredictable noise
    weights[n + 2 :] = ANSWER_WEIGHT
    return Tokenized(ids, weights, "copy")


def tokenized_world(
    world_index: int, max_len: int = 4096, max_context_tokens: int = 3000, num_recall: int = 0, num_copy: int = 0
) -> list[Tokenized]:
    """Tokenized examples of train world `world_index` (see `world_examples`), plus `num_copy` random
    copy examples; examples longer than `max_len` tokens are dropped."""
    assert _TOKENIZER is not None, "call _init_worker first"
    out = []
    examples = world_examples(
        world_index, max_context_tokens=max_context_tokens, max_needle_tokens=min(4000, max_context_tokens + 1000),
        num_recall=num_recall,
    )
    for e in examples:
        t = tokenize_example(_TOKENIZER, e)
        if len(t.token_ids) <= max_len:
            out.append(t)
    rng = random.Random(f"copy:{world_index}")
    out += [copy_example(_TOKENIZER, rng, max_context_tokens) for _ in range(num_copy)]
    return out


def batches(
    stream: Iterator[list[Tokenized]], *, max_batch_tokens: int, buffer_size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted padded batches ([B, L] ids, [B, L] weights) of at most `max_batch_tokens` cells.

    Examples are buffered, sorted by length so padding stays small, cut into batches, and the batches
    shuffled, so one batch mixes kinds but not lengths.
    """
    rng = random.Random(seed)
    buffer: list[Tokenized] = []
    for items in stream:
        buffer += items
        if len(buffer) < buffer_size:
            continue
        buffer.sort(key=lambda t: len(t.token_ids))
        groups: list[list[Tokenized]] = []
        current: list[Tokenized] = []
        for t in buffer:
            if current and (len(current) + 1) * len(t.token_ids) > max_batch_tokens:
                groups.append(current)
                current = []
            current.append(t)
        buffer = current  # the longest, unfinished group waits for the next round
        rng.shuffle(groups)
        for group in groups:
            length = max(len(t.token_ids) for t in group)
            ids = np.zeros((len(group), length), dtype=np.int64)
            weights = np.zeros((len(group), length), dtype=np.float32)
            for row, t in enumerate(group):
                ids[row, : len(t.token_ids)] = t.token_ids
                weights[row, : len(t.token_ids)] = t.loss_weights
            yield ids, weights
