"""Answer quality of every terse layer on the synthetic doc-QA test split, with the reference model.

    PYTHONPATH=. python bench/quality.py [--backend hf:terse/models/reference] [--worlds 2]
        [--configs full,retrieval-k5,compress-4x,...] [--write-docs]

Each configuration answers the same test questions (greedy) and reports exact match per question
kind, prompt tokens sent per question and seconds per question. Layers are imported lazily: a
configuration whose layer is missing from this checkout is skipped with the reason printed. Results go
to bench/results/quality.json and (with --write-docs) to the "Quality" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from terse.answer_match import contains_all, exact_match  # noqa: E402
from terse.organize.formats import qa_messages  # noqa: E402
from terse.synth import SplitConfig, SplitData, build_split  # noqa: E402
from terse.synth.questions import Question  # noqa: E402

Context = tuple[str, str]
ContextFn = Callable[[Question], list[Context]]


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration: how contexts are built, how the answer is produced, which backend."""

    name: str
    contexts: str = "full"
    """"full" (the question's benchmark context), "retrieval" (top-k chunks) or "compress"."""
    answer: str = "direct"
    """"direct" (one QA call), "sot" (Skeleton-of-Thought) or "dag" (plan, sub-questions, synthesis)."""
    kinds: tuple[str, ...] = ("single", "multi", "list", "needle")
    top_k: int = 5
    rate: float = 0.25
    engine: dict[str, Any] = field(default_factory=dict)
    """Local-engine config fields; non-empty means the setting needs the `local:` backend."""
    streaming_window: int = 0
    """> 0: answer with a sink + window streaming KV cache of this many recent tokens (local engine)."""


SETTINGS = [
    Setting("full"),
    Setting("retrieval-k5", contexts="retrieval", kinds=("single", "multi", "list")),
    Setting("compress-4x", contexts="compress", rate=0.25, kinds=("single", "multi", "list")),
    Setting("local-dense", engine={"sparse_prefill": False}),
    # docqa-synth prompts hold ~2.3K tokens: a 1K threshold prefills them sparsely (the engine's 32K would not)
    Setting("local-sparse-prefill", engine={"sparse_prefill": {"enabled": True, "min_sparse_q_len": 1024}}),
    Setting("local-streaming-kv-1k", engine={"sparse_prefill": False}, streaming_window=1024),
    Setting("sot", answer="sot", kinds=("list",)),
    Setting("dag", answer="dag", kinds=("multi",)),
    Setting("compress-2x", contexts="compress", rate=0.5, kinds=("single", "multi", "list")),
    Setting("compress-8x", contexts="compress", rate=0.125, kinds=("single", "multi", "list")),
]


def score(q: Question, text: str, answer: str) -> bool:
    if answer == "sot":
        return contains_all(text, q.items)
    return exact_match(text, q.answer, q.items)


def context_builder(setting: Setting, data: SplitData, backend: Any) -> ContextFn:
    """The function giving a question's contexts under `setting` (raises ImportError if its layer is absent)."""
    def full(q: Question) -> list[Context]:
        return [(i, data.document(i).text) for i in q.context_doc_ids]

    if setting.contexts == "full":
        return full
    if setting.contexts == "retrieval":
        from terse.retrieval import Document, Retriever

        retriever = Retriever()
        retriever.add_documents(Document(d.doc_id, d.text) for d in data.documents if d.kind != "haystack")

        def retrieved(q: Question) -> list[Context]:
            hits = retriever.search(q.question, k=setting.top_k, doc_ids=list(q.context_doc_ids))
            return [(f"{h.doc_id}#{h.chunk_index}", h.text) for h in hits]

        return retrieved
    from terse.compress import Budget, PromptCompressor

    compressor = PromptCompressor(backend)

    def compressed(q: Question) -> list[Context]:
        docs = full(q)
        result = compressor.compress([t for _, t in docs], question=q.question, budget=Budget(rate=setting.rate))
        return [(doc_id, text) for (doc_id, _), text in zip(docs, result.contexts) if text]

    return compressed


def answer_all(setting: Setting, backend: Any, questions: Sequence[Question], contexts: ContextFn) -> list[tuple[str, int]]:
    """(answer text, prompt tokens sent) per question."""
    from terse.backend.types import SamplingParams, StreamingKV

    if setting.answer == "sot":
        from terse.organize import SkeletonOfThought

        sot = SkeletonOfThought(backend)
        runs = [sot.run(q.question, contexts(q)) for q in questions]
        return [(r.text, r.usage.prompt_tokens) for r in runs]
    if setting.answer == "dag":
        from terse.organize import DagDecomposition

        dag = DagDecomposition(backend)
        runs = [dag.run(q.question, contexts(q)) for q in questions]
        return [(r.text, r.usage.prompt_tokens) for r in runs]
    streaming = StreamingKV(4, setting.streaming_window) if setting.streaming_window else None
    params = SamplingParams(max_tokens=64, streaming_kv=streaming)
    prompts = [backend.render_chat(qa_messages(q.question, contexts(q))) for q in questions]
    completions = backend.generate(prompts, params)
    return [(c.text, c.usage.prompt_tokens) for c in completions]


def run_setting(setting: Setting, backend: Any, data: SplitData) -> dict[str, Any]:
    questions = [q for q in data.questions if q.kind in setting.kinds]
    start = time.perf_counter()
    contexts = context_builder(setting, data, backend)
    answers = answer_all(setting, backend, questions, contexts)
    seconds = time.perf_counter() - start
    hits: dict[str, list[bool]] = defaultdict(list)
    tokens: dict[str, list[int]] = defaultdict(list)
    for q, (text, num_tokens) in zip(questions, answers):
        hits[q.kind].append(score(q, text, setting.answer))
        tokens[q.kind].append(num_tokens)
    return {
        "exact_match": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "num_questions": {k: len(v) for k, v in sorted(hits.items())},
        "prompt_tokens_per_question": {k: sum(v) / len(v) for k, v in sorted(tokens.items())},
        "seconds_per_question": seconds / max(1, len(questions)),
        "examples": [{"question": q.question, "gold": q.answer, "answer": a} for q, (a, _) in list(zip(questions, answers))[:3]],
    }


def load(spec: str, setting: Setting, cache: dict[str, Any]) -> Any:
    """The backend a setting runs on: `spec` as given, or `local:<model>` with the setting's engine fields."""
    import terse

    if setting.engine or setting.streaming_window:
        import torch

        model = spec.partition(":")[2]
        fields = dict(setting.engine)
        if not torch.cuda.is_available():
            # The engine sizes its KV pool as a fraction of free memory; on a shared CPU host give it a
            # fixed pool instead (65K tokens: ~0.5 GB for the reference model in float32).
            fields.setdefault("num_kv_blocks", 4096)
        key = f"local:{model}:{sorted(fields.items())}"
        if key not in cache:
            cache[key] = terse.load_backend(f"local:{model}", **fields)
        return cache[key]
    if spec not in cache:
        cache[spec] = terse.load_backend(spec)
    return cache[spec]


def markdown(results: dict[str, Any]) -> str:
    kinds = ("single", "multi", "list", "needle")
    lines = [
        "| configuration | " + " | ".join(f"EM {k}" for k in kinds) + " | prompt tokens / question | s / question |",
        "|---|" + "---|" * (len(kinds) + 2),
    ]
    for name, r in results["settings"].items():
        if "skipped" in r:
            lines.append(f"| {name} | " + " | ".join("—" for _ in kinds) + f" | skipped: {r['skipped']} | |")
            continue
        em = [f"{r['exact_match'][k]:.2f} ({r['num_questions'][k]})" if k in r["exact_match"] else "—" for k in kinds]
        toks = r["prompt_tokens_per_question"]
        mean_tokens = sum(toks[k] * r["num_questions"][k] for k in toks) / sum(r["num_questions"].values())
        lines.append(f"| {name} | " + " | ".join(em) + f" | {mean_tokens:.0f} | {r['seconds_per_question']:.2f} |")
    return "\n".join(lines)


def write_docs(results: dict[str, Any], command: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    heading = "## Quality: synthetic doc-QA with the reference model"
    section = (
        f"{heading}\n\nCommand: `{command}`\n\nHardware: {results['hardware']}; {results['versions']}.\n"
        f"Backend: `{results['backend']}`; test split, {results['num_worlds']} world(s), greedy decoding; EM is "
        "exact match after case/whitespace/period normalisation (list answers: the item set; SoT: every item "
        "present in the merged answer); (n) = questions. Raw numbers: `bench/results/quality.json`.\n\n"
        f"{markdown(results)}\n"
        + (f"\n{results['note']}\n" if results.get("note") else "")
    )
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if heading in text:
        head, _, rest = text.partition(heading)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else "\n"
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="hf:terse/models/reference")
    parser.add_argument("--worlds", type=int, default=2, help="test-split worlds (each ~10 questions per kind)")
    parser.add_argument("--configs", default=",".join(s.name for s in SETTINGS))
    parser.add_argument("--needle-lengths", default="512,1024,2048,4096")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--note", default="", help="a remark printed under the table in docs/benchmarks.md")
    args = parser.parse_args(argv)
    import torch
    import transformers

    wanted = args.configs.split(",")
    lengths = tuple(int(x) for x in args.needle_lengths.split(",") if x)
    data = build_split("test", SplitConfig(num_worlds=args.worlds, needle_lengths=lengths, needle_depths=(0.0, 0.5, 1.0)))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    results: dict[str, Any] = {
        "backend": args.backend, "num_worlds": args.worlds, "hardware": device,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}", "settings": {},
        "note": args.note,
    }
    cache: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name not in wanted:
            continue
        try:
            backend = load(args.backend, setting, cache)
            results["settings"][setting.name] = run_setting(setting, backend, data)
        except (ImportError, AttributeError, KeyError, NotImplementedError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            print(f"[quality] skipping {setting.name}: {reason}", file=sys.stderr)
            results["settings"][setting.name] = {"skipped": reason}
            continue
        r = results["settings"][setting.name]
        print(f"[quality] {setting.name}: EM {r['exact_match']} tokens {r['prompt_tokens_per_question']}", file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after every setting: a long run keeps what it did
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.write_docs:
        write_docs(results, "PYTHONPATH=. python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
