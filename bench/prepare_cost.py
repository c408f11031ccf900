"""Middleware overhead: what preparing a doc-QA prompt costs next to tokenizing its documents once.

    .venv/bin/python bench/prepare_cost.py [--num-worlds 4] [--repeats 5] [--label cpu]

Workload: the synthetic doc-QA benchmark (terse.synth test split, single-hop, multi-hop and list
questions, each over ~2.4K tokens of gold documents among distractors), the default `DocQAConfig`
(context-size routing, BM25 coarse + sentence ranking, exact fit to 240 tokens), the shipped reference
model's tokenizer and chat template (the model itself is never run).

Per question, in one process, interleaved so machine load hits all alike:
- floor: tokenizing each of the question's documents once with the same tokenizer (the Rust
  `tokenizers` encoder directly: no wrapper overhead, the strictest floor);
- job: `Preparer.prepare` of every question in job order on one fresh preparer (documents recur
  across questions, as in a job; what a job pays);
- cold: every cache forgotten before each question (no document seen before; the tokenizer itself
  stays as warm as in any running process);
- compress: `PromptCompressor.compress` of the question's documents alone (job order, one compressor).
Each figure is the median over `--repeats` passes of the per-pass total, divided by the number of
questions. Tokenizer calls are counted at the Rust encoder (every text encoded counts one).
Raw numbers: bench/results/prepare_cost_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CountingEncoder:
    """Stands in for a `tokenizers.Tokenizer`, counting every text it encodes."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.num_texts = 0

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.num_texts += 1
        return self._inner.encode(*args, **kwargs)

    def encode_batch(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.num_texts += len(inputs)
        return self._inner.encode_batch(inputs, *args, **kwargs)

    def encode_batch_fast(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.num_texts += len(inputs)
        return self._inner.encode_batch_fast(inputs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-worlds", type=int, default=4)
    p.add_argument("--questions-per-kind", type=int, default=6)
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import terse
    from terse.backend.registry import load_backend
    from terse.compress import Budget, CompressorConfig, PromptCompressor
    from terse.pipelines.docqa import DocQAConfig
    from terse.pipelines.docqa.answerer import BatchAnswerer
    from terse.pipelines.docqa.contexts import relevant_documents
    from terse.pipelines.docqa.inputs import load_corpus, read_questions
    from terse.pipelines.docqa.sample import REFERENCE_MODEL_DIR, write_synthetic

    workdir = Path(tempfile.mkdtemp(prefix="terse-bench-prepare-"))
    docs_path, questions_path = write_synthetic(workdir, num_worlds=args.num_worlds,
                                                questions_per_kind=args.questions_per_kind,
                                                context_tokens=args.context_tokens)
    corpus = load_corpus([docs_path])
    questions = read_questions(questions_path)
    backend = load_backend(f"hf:{REFERENCE_MODEL_DIR}", device="cpu")
    hf_tokenizer: Any = backend.tokenizer  # type: ignore[attr-defined]
    counting = CountingEncoder(hf_tokenizer._tokenizer)
    hf_tokenizer._tokenizer = counting
    rust = counting._inner

    def counted(preparer: Any) -> Any:
        """Count the encodes of the preparer's own tokenizer copy too (when it keeps one)."""
        target = getattr(getattr(getattr(preparer, "naive", None), "analyses", None), "tokenizer", None)
        if target is not None and hasattr(target, "_rust") and not isinstance(target._rust, CountingEncoder):
            inner = target._rust
            target._rust = CountingEncoder(inner)
            target._rust.num_texts = 0
            shared.append(target._rust)
        return preparer

    shared: list[CountingEncoder] = [counting]

    def num_texts() -> int:
        return sum(c.num_texts for c in shared)
    config = DocQAConfig(backend="hf:reference")
    doc_texts = [[d.text for d in relevant_documents(q, corpus)] for q in questions]
    num_doc_tokens = [sum(len(rust.encode(t, add_special_tokens=False).ids) for t in texts) for texts in doc_texts]

    def floor_pass() -> float:
        t0 = time.perf_counter()
        for texts in doc_texts:
            for text in texts:
                rust.encode(text, add_special_tokens=False)
        return time.perf_counter() - t0

    def job_pass() -> float:
        preparer = counted(BatchAnswerer(config, backend, corpus).preparer)
        t0 = time.perf_counter()
        for q in questions:
            preparer.prepare(q)
        return time.perf_counter() - t0

    cold_preparer = counted(BatchAnswerer(config, backend, corpus).preparer)

    def cold_pass() -> float:
        total = 0.0
        for q in questions:
            if hasattr(cold_preparer, "clear_caches"):
                cold_preparer.clear_caches()
            t0 = time.perf_counter()
            cold_preparer.prepare(q)
            total += time.perf_counter() - t0
        return total

    compressor = PromptCompressor(None, backend, CompressorConfig(token_pruner=None, sentence_ranker="same",
                                                                   reorder="original"))
    counted(type("Holder", (), {"naive": type("N", (), {"analyses": getattr(compressor, "analyses", None)})})())

    def compress_pass() -> float:
        t0 = time.perf_counter()
        for q, texts in zip(questions, doc_texts):
            compressor.compress(texts, question=q.question, budget=Budget(target_tokens=240))
        return time.perf_counter() - t0

    passes: dict[str, Callable[[], float]] = {"floor": floor_pass, "job": job_pass, "cold": cold_pass,
                                              "compress": compress_pass}
    calls: dict[str, float] = {}
    for name, fn in passes.items():  # one untimed pass each (imports, first-use loads), counting calls
        before = num_texts()
        fn()
        calls[name] = (num_texts() - before) / len(questions)
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, fn in passes.items():
            times[name].append(fn())
    n = len(questions)
    per_q = {name: statistics.median(ts) / n for name, ts in times.items()}
    floor = per_q["floor"]
    result = {
        "label": args.label, "num_questions": n, "num_worlds": args.num_worlds,
        "mean_document_tokens": statistics.mean(num_doc_tokens),
        "ms_per_question": {k: v * 1e3 for k, v in per_q.items()},
        "ratio_to_tokenize_once": {k: v / floor for k, v in per_q.items() if k != "floor"},
        "tokenizer_texts_per_question": calls,
        "passes_s": times,
        "hardware": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "versions": {"terse": terse.__version__, "python": platform.python_version()},
    }
    out = args.out or Path(__file__).parent / "results" / f"prepare_cost_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{n} questions, {result['mean_document_tokens']:.0f} document tokens each, median of {args.repeats} "
          f"passes ({out})")
    print(f"{'what':<10}{'ms/question':>13}{'x tokenize once':>17}{'tokenizer texts/q':>19}")
    for name in passes:
        ratio = f"{per_q[name] / floor:.2f}" if name != "floor" else "1.00"
        print(f"{name:<10}{per_q[name] * 1e3:>13.2f}{ratio:>17}{calls[name]:>19.1f}")
    backend.close()


if __name__ == "__main__":
    main()
