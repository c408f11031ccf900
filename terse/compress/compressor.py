"""`PromptCompressor`: question-aware coarse-to-fine prompt compression to an exact token budget.

    contexts ──► coarse (rank, select, ratios) ──► sentence filter ──► token pruner ──► exact fit
                 rankers.py / coarse.py             sentences.py        tokens.py          fit.py

Each stage is optional (see `CompressorConfig`) and only refines the keep priority of words; the
exact-fit stage alone decides what is kept, measuring the real prompt in the target tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from terse.backend.base import Backend
from terse.compress.analysis import AnalysisCache, DocAnalysis, PromptCosts
from terse.compress.coarse import CoarseStage, assign_ratios, output_order
from terse.compress.config import Budget, CompressorConfig, ProtectionPolicy
from terse.compress.fit import Prompt
from terse.compress.fit_model import fit_exact
from terse.compress.plan import DocPlan, Stage, StageEnv, TokenCounter
from terse.compress.protect import protected_groups, protected_words, structural_spans, user_spans
from terse.compress.rankers import Ranker, build_ranker, terms
from terse.compress.result import CompressionResult, ContextReport
from terse.compress.sentences import SentenceFilter
from terse.compress.tokenizer import TargetTokenizer, target_tokenizer_of
from terse.compress.tokens import TOKEN_PRUNERS
from terse.errors import ConfigError


class PromptCompressor:
    """Compresses prompts with a scorer Backend, counting the budget in a target model's tokenizer.

    `scorer` may be None when no stage needs a language model (rankers "bm25"/"embedding", sentence
    ranker likewise, `token_pruner=None`). `target_tokenizer` is a Backend, a fast tokenizer, a
    `TargetTokenizer` (see `tokenizer.py`, e.g. `load_target_tokenizer(name)`) or a `str -> int`
    counter; it defaults to the scorer's. Instances are reusable and thread-safe; they keep their
    rankers' models loaded and a cache of per-context analyses (one tokenization per distinct
    context text, however many questions it serves).
    """

    def __init__(
        self,
        scorer: Backend | None,
        target_tokenizer: Backend | TargetTokenizer | Callable[[str], int] | Any | None = None,
        config: CompressorConfig | None = None,
        analyses: AnalysisCache | None = None,
    ) -> None:
        """`analyses` shares a cache of context analyses with other users of the same target
        tokenizer (e.g. a doc-QA job's prompt accounting); by default the compressor keeps its own."""
        self.scorer = scorer
        self.config = config or CompressorConfig()
        self.tokenizer = analyses.tokenizer if analyses is not None else _target(scorer, target_tokenizer)
        self.count_tokens: TokenCounter = self.tokenizer.count
        self.analyses = analyses if analyses is not None else AnalysisCache(self.tokenizer)
        self._rankers: dict[str, Ranker] = {}
        self._constants: dict[str, int] = {}
        self._stages = self._build_stages()

    def with_config(self, config: CompressorConfig) -> PromptCompressor:
        """A compressor with other settings sharing this one's scorer, tokenizer, caches and rankers."""
        other = PromptCompressor.__new__(PromptCompressor)
        other.scorer, other.config, other.tokenizer = self.scorer, config, self.tokenizer
        other.count_tokens, other.analyses, other._constants = self.count_tokens, self.analyses, self._constants
        same_models = config.embedding_model == self.config.embedding_model
        other._rankers = self._rankers if same_models else {}
        other._stages = other._build_stages()
        return other

    def clear_caches(self) -> None:
        """Forget every cached context analysis and ranker statistic (to bound memory between jobs,
        or to measure what unseen contexts cost). Loaded models stay loaded."""
        self.analyses.clear()
        for ranker in self._rankers.values():
            clear = getattr(ranker, "clear", None)
            if clear is not None:
                clear()

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
        `InvalidRequestError` when the instruction, question and the user's protected spans alone
        exceed the target. Output words are whole words of the input, in their original order within
        a context. `condition` is the text the stages rank and score against when it differs from
        `question` (e.g. a chat turn kept elsewhere); it is not part of the returned prompt.

        Tokenizer use, with a target tokenizer that has offsets: each distinct context text once (then
        cached), one count of the verbatim parts (none without instruction and question), one of the
        final prompt (more only when the tokenizer merges across a cut), plus one batched edge check
        per new context.
        """
        start = time.perf_counter()
        docs = [contexts] if isinstance(contexts, str) else list(contexts)
        if any(not isinstance(d, str) for d in docs):
            raise ConfigError("contexts must be a string or a sequence of strings")
        policy = protect or ProtectionPolicy()
        plans = [self._plan(i, text, policy) for i, text in enumerate(docs)]
        sep = self.config.context_separator
        original = Prompt(instruction, question, sep, tuple(range(len(plans))))
        num_fixed = 0  # the verbatim parts, measured around a one-token stand-in context (chat has none)
        if instruction or question:
            num_fixed = self.count_tokens(_join([instruction, "x", question], sep)) - self._constant("x")
        costs = self._costs(num_fixed, sep) if all(p.analysis and p.analysis.has_offsets for p in plans) else None
        num_original = self._num_original(plans, instruction, question, sep, num_fixed, costs)
        target = budget.resolve(num_original, num_fixed if any(docs) else num_original)
        conditioning = question if condition is None else condition
        env = StageEnv(self.scorer, conditioning, self.count_tokens, self.config, max(1, target - num_fixed), costs)
        if target < num_original:
            _mark_question_sentences(plans, conditioning, self.config.question_sentences_first)
            assign_ratios(plans, env.context_budget, 0.0)
            for stage in self._stages:
                t0 = time.perf_counter()
                stage.run(plans, env)
                env.timings[stage.name] = time.perf_counter() - t0
        prompt = Prompt(instruction, question, sep, tuple(output_order(plans, self.config.reorder)))
        if target >= num_original:
            prompt = original
        t0 = time.perf_counter()
        assembled, num_compressed, state = fit_exact(plans, prompt, self.tokenizer, costs, target,
                                                     self.config.fit_max_probes)
        env.timings["fit"] = time.perf_counter() - t0
        if state is not None:
            kept_tokens = state.context_tokens
        else:
            kept_tokens = [n if t else 0 for n, t in zip(self.tokenizer.count_many(assembled.contexts),
                                                         assembled.contexts)]
        env.timings["total"] = time.perf_counter() - start
        reports = tuple(
            ContextReport(p.index, p.rank, p.score, p.num_tokens, kept_tokens[k] if text else 0)
            for k, (p, text) in enumerate(zip(plans, assembled.contexts))
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

    def _constant(self, text: str) -> int:
        """Token count of a short fixed text, counted once per compressor."""
        if text not in self._constants:
            self._constants[text] = self.count_tokens(text)
        return self._constants[text]

    def _costs(self, num_fixed: int, sep: str) -> PromptCosts:
        sep_tokens = self._constant(sep)
        return PromptCosts(num_fixed - sep_tokens, sep_tokens, self._constant(" "), self._constant("\n"))

    def _num_original(self, plans: Sequence[DocPlan], instruction: str, question: str, sep: str, num_fixed: int,
                      costs: PromptCosts | None) -> int:
        """Tokens of the uncompressed prompt: the verbatim parts measured around a one-token stand-in
        context plus each context's own count, when no context's edges merge with the separator
        (checked once per context text); measured whole otherwise."""
        present = [p for p in plans if p.text]
        if costs is not None and present and all(self._edges_split(p.analysis, sep) for p in present):
            return costs.base + sum(costs.separator + p.num_tokens for p in present)
        return self.count_tokens(_join([instruction, sep.join(p.text for p in present), question], sep))

    def _edges_split(self, analysis: DocAnalysis | None, sep: str) -> bool:
        """Whether the tokenizer splits `sep` from the text's first and last words, as it does from a
        one-token stand-in: then the text's own count adds exactly to the prompt's. Checked once per
        text and separator (one batched call)."""
        assert analysis is not None
        verdict = analysis.edges_split.get(sep)
        if verdict is None:
            words = analysis.words
            verdict = False
            if words:
                head, tail = analysis.text[: words[0].end], analysis.text[words[-1].start :]
                x, n_sep = self._constant("x"), self._constant(sep)
                stand_in = self._constant(sep + "x") - x == n_sep and self._constant("x" + sep) - x == n_sep
                a, b, c, d = self.tokenizer.count_many([sep + head, head, tail + sep, tail])
                verdict = stand_in and a - b == n_sep and c - d == n_sep
            analysis.edges_split[sep] = verdict
        return verdict

    def _plan(self, index: int, text: str, policy: ProtectionPolicy) -> DocPlan:
        analysis = self.analyses.get(text)
        flags = analysis.protected.get(policy)
        if flags is None:
            groups = protected_groups(analysis.words, structural_spans(text, policy))
            flags = (protected_words(analysis.words, user_spans(text, policy)), groups)
            analysis.protected[policy] = flags
        return DocPlan(
            index=index,
            text=text,
            words=analysis.words,
            sentence_ids=analysis.sentence_ids,
            user_protected=flags[0],
            struct_protected=[g >= 0 for g in flags[1]],
            struct_groups=flags[1],
            struct_first=not policy.rank_with_context,
            num_tokens=analysis.num_tokens,
            analysis=analysis,
        )


def _mark_question_sentences(plans: Sequence[DocPlan], question: str, enabled: bool) -> None:
    """Record, per plan, the sentences sharing a search term with the question (see `plan.py`)."""
    query = set(terms(question)) if enabled else set()
    if not query:
        return
    for plan in plans:
        if plan.analysis is not None:
            plan.question_sentences = {
                s for s, counts in enumerate(plan.analysis.sentence_terms) if not query.isdisjoint(counts)
            }


def _join(parts: Sequence[str], sep: str) -> str:
    return sep.join(p for p in parts if p)


def _target(scorer: Backend | None, target: Any) -> TargetTokenizer:
    if target is None:
        if scorer is None:
            raise ConfigError("give a target_tokenizer (Backend, tokenizer or str -> int counter) when scorer is None")
        return target_tokenizer_of(scorer)
    return target_tokenizer_of(target)
