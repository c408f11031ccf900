"""Token-level grammars for structured output, through llguidance.

    Constraint --GrammarCompiler.compile()--> ConstraintState (one per request; a grammar matcher)
    ConstraintState rows --fill_bitmask()--> bitmask [R, ceil(V / 32)] int32 (bit t of row r: token t allowed)
    bitmask --terse.backend.sampling.apply_token_bitmask()--> logits of disallowed tokens set to -inf

Why llguidance (over xgrammar and outlines-core): its masks cost tens of microseconds per step even at
128K-token vocabularies without a per-schema compilation pass (a server sees a new schema in almost every
tools request), a batch of masks is filled on its own thread pool with the GIL released, it parses JSON
Schema, regexes and Lark grammars with precise error messages, and it ships as one dependency-free abi3
wheel (one file for every Python >= 3.10; no torch or CUDA coupling). See docs/structured.md.

The grammar allows EOS only where it is complete; a grammar that can take no further token ends the
request ("stop") without waiting for the model to sample EOS. Each state also keeps a closing plan so a
request that runs out of tokens still ends with a complete value (terse.backend.budget): `GrammarRows`
makes a step's budget decisions, fills its masks and checks its sampled tokens.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from terse.backend.budget import BudgetStep, GrammarBudget
from terse.backend.closing import ClosingPlanner
from terse.backend.constraints import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
)
from terse.errors import InvalidRequestError, TerseError, UnsupportedOperationError

JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON layout the grammar allows: `{"a": 1, "b": [2, 3]}` and nothing looser. Free whitespace lets a weak
model pad with newlines until max_tokens; one fixed layout keeps every output short and parseable."""
_CACHE_SIZE = 256  # compiled grammars kept per tokenizer (LRU); a cached one is copied, not rebuilt


class GrammarViolationError(TerseError):
    """A sampled token broke the request's grammar (a bug or a backend that skipped the mask)."""


def bitmask_width(vocab_size: int) -> int:
    """int32 words per mask row."""
    return (vocab_size + 31) // 32


class ConstraintState:
    """One request's position in its grammar and its closing plan. Not thread-safe: one owner at a time
    (the decode loop, or the mask worker while it fills the step's masks)."""

    def __init__(self, matcher: Any, budget: GrammarBudget) -> None:
        self._matcher = matcher
        self._budget = budget
        self._guard = budget.guard()

    def shortest_len(self) -> int | None:
        """Tokens of the grammar's shortest complete output from its start (searched once per grammar;
        None: none found)."""
        return self._budget.min_len()

    @property
    def quick_len(self) -> int | None:
        """Tokens of the grammar's quick (greedy) complete output from its start, found at compile time
        (None: none found); at least `shortest_len()`."""
        return self._budget.quick_len

    def check_budget(self, max_tokens: int, room: int | None = None) -> None:
        """Raise `InvalidRequestError` (param max_tokens) when `max_tokens` (or `room`, the context left
        after the prompt) cannot hold the grammar's shortest complete output."""
        self._budget.check(max_tokens, room)

    @property
    def matcher(self) -> Any:
        return self._matcher

    @property
    def is_finished(self) -> bool:
        """True once the grammar can take no token but EOS."""
        return bool(self._matcher.is_stopped())

    def advance(self, token_id: int) -> bool:
        """Consume one sampled token; return True when the grammar is now finished.

        Raises `GrammarViolationError` when the token was not allowed (the mask was not applied)."""
        if not self._matcher.consume_token(token_id):
            raise GrammarViolationError(
                f"token {token_id} is not allowed by the request's grammar here: {self._matcher.get_error()}"
            )
        self._guard.on_token(token_id)
        return bool(self._matcher.is_stopped())

    @property
    def closed_by_budget(self) -> bool:
        """True once the token budget decided one of this request's tokens (it then finishes "length")."""
        return self._guard.closed

    def budget_step(self, remaining: int) -> BudgetStep:
        """What the next token must do about the budget (`remaining` tokens left, this one included)."""
        return self._guard.step(self._matcher, remaining)

    def check_token(self, token_id: int, remaining: int) -> int:
        """The token to keep after a CHECK step sampled `token_id` (itself, or the closing plan's)."""
        return self._guard.check(self._matcher, token_id, remaining)

    def fill_row(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this state's allowed-token bits into `bitmask[row]` (CPU, int32, contiguous)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)


_executor: Any = None
_executor_lock = threading.Lock()


def _shared_executor() -> Any:
    """llguidance's thread pool for batches of masks (half the cores, 1..8): created once per process."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
        return _executor


def fill_bitmask(states: Sequence[ConstraintState], bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Fill `bitmask` [>= R, W] (CPU int32, contiguous) with each state's mask: state i in row rows[i]
    (default: row i).

    Several rows go through llguidance's thread pool in one call (the GIL is released meanwhile)."""
    assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
    targets = list(range(len(states))) if rows is None else list(rows)
    if len(states) <= 1:
        for state, row in zip(states, targets):
            state.fill_row(bitmask, row)
        return
    width_bytes = bitmask.shape[1] * 4
    jobs = [(s.matcher, row) for s, row in zip(states, targets)]
    _shared_executor().unsafe_compute_mask_ptr(jobs, bitmask.data_ptr(), width_bytes, bitmask.shape[0])


class GrammarRows:
    """The constrained rows of one sampling step: budget decisions, masks, checks of sampled tokens.

    `fill` decides each row's budget step (terse.backend.budget) and writes the masks: a FORCE row allows
    only its plan's token. After sampling, `check` replaces the tokens of CHECK rows that no longer leave
    room to complete the grammar. The states must not advance between `fill` and `check`."""

    def __init__(self, states: Sequence[ConstraintState], remaining: Sequence[int]) -> None:
        assert len(states) == len(remaining)
        self.states = list(states)
        self.remaining = list(remaining)
        """Tokens each row may still generate, this step's included."""
        self.steps: list[BudgetStep] = []

    def fill(self, bitmask: torch.Tensor) -> None:
        """Rows 0..R-1 of `bitmask`: decisions first, then llguidance's masks for the rows not forced."""
        self.steps = [s.budget_step(r) for s, r in zip(self.states, self.remaining)]
        free = [i for i, step in enumerate(self.steps) if step.force is None]
        fill_bitmask([self.states[i] for i in free], bitmask, free)
        with torch.inference_mode():  # the buffer may be an inference tensor; this may run on a worker thread
            for i, step in enumerate(self.steps):
                if step.force is not None:
                    bitmask[i].zero_()
                    bitmask[i, step.force // 32] = _bit(step.force % 32)

    def check(self, ids: torch.Tensor, positions: Sequence[int]) -> None:
        """Checks the sampled ids of CHECK rows, in place. ids: [N] int64 (any device), row i's token at
        ids[positions[i]]. Reads those ids back to the host (a synchronisation on a GPU), only when a
        row asks for it."""
        rows = [i for i, step in enumerate(self.steps) if step.check]
        if not rows:
            return
        index = torch.tensor([positions[i] for i in rows], device=ids.device)
        sampled = ids.index_select(0, index).tolist()
        fixed = [self.states[i].check_token(t, self.remaining[i]) for i, t in zip(rows, sampled)]
        if fixed != sampled:
            ids.index_copy_(0, index, torch.tensor(fixed, dtype=ids.dtype).to(ids.device))


def _bit(position: int) -> int:
    """int32 word with bit `position` set (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


class GrammarCompiler:
    """Compiles constraints against one tokenizer. Thread-safe; the tokenizer index is built on first use.

    vocab_size is the logits width (it may exceed the tokenizer's size: padded rows are never allowed);
    eos_token_ids are the tokens that end generation (allowed only where the grammar is complete).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._planner: ClosingPlanner | None = None
        self._cache: OrderedDict[Constraint, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    def _ll(self) -> Any:
        if self._ll_tokenizer is None:
            if not isinstance(self._tokenizer, PreTrainedTokenizerFast):
                raise UnsupportedOperationError(
                    f"structured output needs a fast (Rust) tokenizer; {type(self._tokenizer).__name__} is not "
                    f"one. Save the model with a tokenizer.json"
                )
            import llguidance.hf

            if len(self._tokenizer) > self.vocab_size:
                raise UnsupportedOperationError(
                    f"the tokenizer has {len(self._tokenizer)} tokens but the model only {self.vocab_size} logits"
                )
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
            self._planner = ClosingPlanner(self._ll_tokenizer, self.vocab_size, self._eos)
        return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> ConstraintState:
        """A fresh state at the start of `constraint`'s grammar.

        Raises `InvalidRequestError` naming the problem for an invalid regex, schema or grammar."""
        import llguidance

        with self._lock:
            ll_tokenizer = self._ll()
            planner = self._planner
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
        assert planner is not None
        if compiled is None:
            grammar = grammar_text(constraint)
            matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)  # releases the GIL while building
            if matcher.is_error():
                raise InvalidRequestError(f"invalid {_kind(constraint)}: {matcher.get_error()}")
            compiled = _Compiled(matcher, GrammarBudget(planner, matcher, _OUTPUT_KIND[type(constraint)]))
            with self._lock:
                self._cache[constraint] = compiled
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ConstraintState(compiled.matcher.deep_copy(), compiled.budget)


class _Compiled(NamedTuple):
    """A compiled constraint as cached: its pristine matcher and what its requests' budgets share."""

    matcher: Any
    budget: GrammarBudget


_OUTPUT_KIND: dict[type, str] = {
    RegexConstraint: "match of the regex",
    JsonSchemaConstraint: "JSON value of the schema",
    JsonObjectConstraint: "JSON object",
    ChoiceConstraint: "choice",
    GrammarConstraint: "output of the grammar",
    ToolCallConstraint: "tool call",
}


def _kind(constraint: Constraint) -> str:
    return {
        RegexConstraint: "regex",
        JsonSchemaConstraint: "JSON schema",
        JsonObjectConstraint: "JSON object constraint",
        ChoiceConstraint: "choices",
        GrammarConstraint: "grammar",
        ToolCallConstraint: "tool definitions",
    }[type(constraint)]


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar (JSON text) of a constraint. Does not validate; `LLMatcher` does."""
    from llguidance import LLMatcher

    if isinstance(constraint, RegexConstraint):
        return str(LLMatcher.grammar_from_regex(constraint.pattern))
    if isinstance(constraint, JsonSchemaConstraint):
        schema = constraint.schema
        schema = strict_schema(schema) if constraint.strict else schema
        return str(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    if isinstance(constraint, JsonObjectConstraint):
        return str(LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS))
    if isinstance(constraint, ChoiceConstraint):
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in constraint.choices)
        return str(LLMatcher.grammar_from_lark(f"start: {alternatives}\n"))
    if isinstance(constraint, GrammarConstraint):
        return str(LLMatcher.grammar_from_lark(constraint.lark))
    return str(LLMatcher.grammar_from_lark(tool_call_lark(constraint)))


def tool_call_lark(constraint: ToolCallConstraint) -> str:
    """Lark grammar of the tool-call text format (see terse.backend.constraints).

    Each call is `<tool_call>` + {"name": <one of the tools>, "arguments": <its schema>} + `</tool_call>`;
    "auto" also allows plain text that never contains the tag."""
    tools = [constraint.tool(constraint.function)] if constraint.function else list(constraint.tools)
    bodies = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": strict_schema(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if t is not None
    ]
    body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    body = {**body, "x-guidance": JSON_OPTIONS}
    lines = [
        f"call: {json.dumps(TOOL_CALL_OPEN)} %json {json.dumps(body, ensure_ascii=False)} {json.dumps(TOOL_CALL_CLOSE)}",
        "calls: call" if constraint.max_calls == 1 else f'calls: call ("\\n" call){{0,{constraint.max_calls - 1}}}',
    ]
    if constraint.mode == "auto":
        lines += ["start: TEXT | calls", f"TEXT: /(?s:.*)/ & ~/(?s:.*){TOOL_CALL_OPEN}(?s:.*)/"]
    else:
        lines.append("start: calls")
    return "\n".join(lines) + "\n"


def strict_schema(schema: Any) -> Any:
    """OpenAI strict mode: every object schema that does not say otherwise gets additionalProperties false.

    Returns a new schema; subschemas under properties / items / anyOf / $defs / ... are rewritten too."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
            out[key] = {k: strict_schema(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key in ("items", "additionalProperties", "not", "if", "then", "else", "contains", "prefixItems",
                     "anyOf", "oneOf", "allOf", "additionalItems", "unevaluatedProperties"):
            out[key] = strict_schema(value)
        else:
            out[key] = value
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (is_object or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
