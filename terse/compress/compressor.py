"""`PromptCompressor`: question-aware coarse-to-fine prompt compression to an exact token budget.

    contexts ──► coarse (rank, select, ratios) ──► sentence filter ──► token pruner ──► exact fit
                 rankers.py / coarse.py             sentences.py        tokens.py          fit.py

Each stage is optional (see `CompressorConfig`) and only refines the keep priority of words; the
exact-fit stage alone decides what is kept, measuring the real prompt in the target tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from terse.backend.base import Backend
from terse.compress.coarse import CoarseStage, assign_ratios, output_order
from terse.compress.config import Budget, CompressorConfig, ProtectionPolicy
from terse.compress.fit import Prompt, fit
from terse.compress.plan import DocPlan, Stage, StageEnv, TokenCounter
from terse.compress.protect import protected_words, structural_spans, user_spans
from terse.compress.rankers import Ranker, build_ranker
from terse.compress.result import CompressionResult, ContextReport
from terse.compress.sentences import SentenceFilter
from terse.compress.tokens import TOKEN_PRUNERS
from terse.compress.words import sentence_ids, split_words
from terse.errors import ConfigError


class PromptCompressor:
    """Compresses prompts with a scorer Backend, counting the budget in a target model's tokenizer.

    `scorer` may be None when no stage needs a language model (rankers "bm25"/"embedding", sentence
    ranker likewise, `token_pruner=None`). `target_tokenizer` is a Backend or a `str -> int` counter;
    it defaults to the scorer's. Instances are reusable and keep their rankers' models loaded.
    """

    def __init__(
        self,
        scorer: Backend | None,
        target_tokenizer: Backend | Callable[[str], int] | None = None,
        config: CompressorConfig | None = None,
    ) -> None:
        self.scorer = scorer
        self.config = config or CompressorConfig()
        self.count_tokens = _counter(scorer, target_tokenizer)
        self._rankers: dict[str, Ranker] = {}
        self._stages = self._build_stages()

    def with_config(self, config: CompressorConfig) -> PromptCompressor:
        """A compressor with other settings sharing this one's scorer, counter and loaded rankers."""
        other = PromptCompressor.__new__(PromptCompressor)
        other.scorer, other.config, other.count_tokens = self.scorer, config, self.count_tokens
        same_models = config.embedding_model == self.config.embedding_model
        other._rankers = self._rankers if same_models else {}
        other._stages = other._build_stages()
        return other

    def _ranker(self, name: str) -> Ranker:
        if name not in self._rankers:
            self._rankers[name] = build_ranker(name, self.config, self.scorer)
        return self._rankers[name]

    def _build_stages(self) -> list[Stage]:
        stages: list[Stage] = []
        if self.config.ranker is not None:
            stages.append(CoarseStage(self._ranker(self.config.ranker)))
        sentence_ranker = self.config.resolved_sentence_ranker()
        if sentence_ranker is not None:
            stages.append(SentenceFilter(self._ranker(sentence_ranker)))
        if self.config.token_pruner is not None:
            if self.scorer is None:
                raise ConfigError("token_pruner needs a scorer Backend; pass one or set token_pruner=None")
            stages.append(TOKEN_PRUNERS[self.config.token_pruner]())
        return stages

    def compress(
        self,
        contexts: str | Sequence[str],
        *,
        budget: Budget,
        question: str = "",
        instruction: str = "",
        protect: ProtectionPolicy | None = None,
        condition: str | None = None,
    ) -> CompressionResult:
        """Compress `contexts` (one string or a list) for `question` to `budget`.

        The returned prompt is instruction, contexts (compressed, reordered per config) and question,
        joined by `config.context_separator`; the instruction and question are kept verbatim. Raises
        `InvalidRequestError` when the instruction, question and protected spans alone exceed the
        target. Output words are whole words of the input, in their original order within a context.
        `condition` is the text the stages rank and score against when it differs from `question`
        (e.g. a chat turn kept elsewhere); it is not part of the returned prompt.
        """
        start = time.perf_counter()
        docs = [contexts] if isinstance(contexts, str) else list(contexts)
        if any(not isinstance(d, str) for d in docs):
            raise ConfigError("contexts must be a string or a sequence of strings")
        policy = protect or ProtectionPolicy()
        plans = [self._plan(i, text, policy) for i, text in enumerate(docs)]
        sep = self.config.context_separator
        original = Prompt(instruction, question, sep, tuple(range(len(plans))))
        num_original = self.count_tokens(_join([instruction, sep.join(d for d in docs if d), question], sep))
        num_fixed = self.count_tokens(_join([instruction, "x", question], sep)) - self.count_tokens("x")
        target = budget.resolve(num_original, num_fixed if any(docs) else num_original)
        conditioning = question if condition is None else condition
        env = StageEnv(self.scorer, conditioning, self.count_tokens, self.config, max(1, target - num_fixed))
        if target < num_original:
            assign_ratios(plans, env.context_budget, 0.0)
            for stage in self._stages:
                t0 = time.perf_counter()
                stage.run(plans, env)
                env.timings[stage.name] = time.perf_counter() - t0
        prompt = Prompt(instruction, question, sep, tuple(output_order(plans, self.config.reorder)))
        if target >= num_original:
            prompt = original
        t0 = time.perf_counter()
        assembled, num_compressed = fit(plans, prompt, self.count_tokens, target, self.config.fit_max_probes)
        env.timings["fit"] = time.perf_counter() - t0
        env.timings["total"] = time.perf_counter() - start
        reports = tuple(
            ContextReport(p.index, p.rank, p.score, p.num_tokens, self.count_tokens(text) if text else 0)
            for p, text in zip(plans, assembled.contexts)
        )
        present = {s.context_index for s in assembled.spans}
        return CompressionResult(
            text=assembled.text,
            contexts=tuple(assembled.contexts),
            context_order=tuple(plans[i].index for i in prompt.order if plans[i].index in present),
            spans=tuple(assembled.spans),
            num_original_tokens=num_original,
            num_compressed_tokens=num_compressed,
            target_tokens=target,
            reports=reports,
            timings=env.timings,
        )

    def _plan(self, index: int, text: str, policy: ProtectionPolicy) -> DocPlan:
        words = split_words(text)
        return DocPlan(
            index=index,
            text=text,
            words=words,
            sentence_ids=sentence_ids(text, words),
            user_protected=protected_words(words, user_spans(text, policy)),
            struct_protected=protected_words(words, structural_spans(text, policy)),
            num_tokens=self.count_tokens(text) if text else 0,
        )


def _join(parts: Sequence[str], sep: str) -> str:
    return sep.join(p for p in parts if p)


def _counter(scorer: Backend | None, target: Backend | Callable[[str], int] | None) -> TokenCounter:
    if target is None:
        if scorer is None:
            raise ConfigError("give a target_tokenizer (Backend or str -> int counter) when scorer is None")
        return scorer.count_tokens
    if isinstance(target, Backend):
        return target.count_tokens
    if callable(target):
        return target
    raise ConfigError(f"target_tokenizer={target!r} must be a Backend, a str -> int callable, or None")
