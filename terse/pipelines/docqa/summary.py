"""The summary of a doc-QA job: answered, failed, accuracy, tokens saved, throughput.

Numbers only; the CLI formats them. Totals cover every answer in the answers file (all runs of a
resumed job): tokens, accuracy, latency, and wall time and throughput, which add the time earlier runs
recorded in the summary they left (so a resumed run with nothing left to do still shows the job's
real time and rate).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from terse.pipelines.docqa.records import AnswerRecord


@dataclass(frozen=True)
class JobSummary:
    """Totals of a doc-QA job."""

    num_questions: int
    """Questions in the questions file."""
    num_answered: int
    """Questions with an answer in the answers file (this run and earlier ones)."""
    num_failed: int
    """Questions whose latest attempt failed (see the failures file); a rerun retries them."""
    num_pending: int
    """Questions not attempted (the job was stopped early); a rerun answers them."""
    num_answered_this_run: int
    """Answers written by this run."""
    num_scored: int
    """Answers with a gold answer to compare against."""
    num_correct: int
    """Answers equal to the gold answer after normalization."""
    original_prompt_tokens: int
    """Tokens the naive prompts (every relevant document pasted) would have cost."""
    prompt_tokens: int
    """Prompt tokens actually sent."""
    cached_tokens: int
    """Prompt tokens the backend served from its prefix cache."""
    completion_tokens: int
    """Tokens generated."""
    wall_s: float
    """Seconds this run took, from loading inputs to the last answer."""
    mean_latency_s: float
    """Mean per-question latency over every answer on file (0.0 when none)."""
    stopped_reason: str | None = None
    """Why the run stopped before the end (None when it went through)."""
    earlier_wall_s: float = 0.0
    """Seconds the earlier runs of this job took (0.0 for a first run)."""

    @property
    def total_wall_s(self) -> float:
        """Seconds all runs of this job took."""
        return self.earlier_wall_s + self.wall_s

    @property
    def accuracy(self) -> float | None:
        """num_correct / num_scored, None without gold answers."""
        return self.num_correct / self.num_scored if self.num_scored else None

    @property
    def tokens_saved(self) -> int:
        return self.original_prompt_tokens - self.prompt_tokens

    @property
    def token_reduction(self) -> float:
        """original / sent prompt tokens (e.g. 6.0 means 6x fewer)."""
        return self.original_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def questions_per_s(self) -> float:
        """Answers on file per second of all runs."""
        return self.num_answered / self.total_wall_s if self.total_wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            accuracy=self.accuracy,
            tokens_saved=self.tokens_saved,
            token_reduction=round(self.token_reduction, 3),
            questions_per_s=round(self.questions_per_s, 4),
            wall_s=round(self.wall_s, 3),
            total_wall_s=round(self.total_wall_s, 3),
            mean_latency_s=round(self.mean_latency_s, 4),
        )
        return data

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs in display order, for a table."""
        acc = self.accuracy
        rows = [
            ("questions", str(self.num_questions)),
            ("answered", f"{self.num_answered} ({self.num_answered_this_run} this run)"),
            ("failed", str(self.num_failed)),
            ("pending", str(self.num_pending)),
            ("accuracy (exact match)", "n/a (no gold answers)" if acc is None
             else f"{acc:.1%} ({self.num_correct}/{self.num_scored})"),
            ("naive prompt tokens", f"{self.original_prompt_tokens:,}"),
            ("prompt tokens sent", f"{self.prompt_tokens:,}"),
            ("tokens saved", f"{self.tokens_saved:,} ({self.token_reduction:.1f}x fewer)"),
            ("cached prompt tokens", f"{self.cached_tokens:,}"),
            ("completion tokens", f"{self.completion_tokens:,}"),
            ("wall time", f"{self.total_wall_s:.1f} s" + (f" ({self.wall_s:.1f} s this run)" if self.earlier_wall_s else "")),
            ("throughput", f"{self.questions_per_s:.2f} questions/s"),
            ("mean latency", f"{self.mean_latency_s:.2f} s"),
        ]
        if self.stopped_reason:
            rows.append(("stopped", self.stopped_reason))
        return rows


def summarize(
    num_questions: int,
    answers: Sequence[AnswerRecord],
    failed_ids: set[str],
    num_answered_this_run: int,
    wall_s: float,
    stopped_reason: str | None = None,
    earlier_wall_s: float = 0.0,
) -> JobSummary:
    """Totals over `answers` (every answer on file); failed ids that were later answered do not count."""
    answered_ids = {a.id for a in answers}
    failed = failed_ids - answered_ids
    scored = [a for a in answers if a.correct is not None]
    return JobSummary(
        num_questions=num_questions,
        num_answered=len(answered_ids),
        num_failed=len(failed),
        num_pending=max(0, num_questions - len(answered_ids) - len(failed)),
        num_answered_this_run=num_answered_this_run,
        num_scored=len(scored),
        num_correct=sum(1 for a in scored if a.correct),
        original_prompt_tokens=sum(a.usage.original_prompt_tokens for a in answers),
        prompt_tokens=sum(a.usage.prompt_tokens for a in answers),
        cached_tokens=sum(a.usage.cached_tokens for a in answers),
        completion_tokens=sum(a.usage.completion_tokens for a in answers),
        wall_s=wall_s,
        mean_latency_s=sum(a.usage.latency_s for a in answers) / len(answers) if answers else 0.0,
        stopped_reason=stopped_reason,
        earlier_wall_s=earlier_wall_s,
    )


def earlier_wall_s(path: Path) -> float:
    """Total seconds recorded by the summary an earlier run left at `path` (0.0 when there is none)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return float(data.get("total_wall_s", data.get("wall_s", 0.0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def write_summary(summary: JobSummary, path: Path) -> None:
    """Write the summary JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
