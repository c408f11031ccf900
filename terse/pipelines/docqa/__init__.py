"""Batch document QA: documents + questions (JSONL) -> answers (JSONL), resumable and measured.

    config.py    DocQAConfig: one frozen section per stage; JSON / TOML loading
    inputs.py    questions file and corpus reading, with line-numbered errors
    contexts.py  ContextSource: whole documents or top-k retrieved chunks
    prepare.py   compression, shared-prefix-first prompts, scheduling by shared documents
    dispatch.py  Dispatch: batch (local engines), asyncio (remote servers), organized (SoT / DAG)
    answerer.py  BatchAnswerer: one batch of questions -> answer / failure records
    journal.py   crash-safe JSONL append and recovery
    job.py       DocQAJob: resume, batches, failures, summary
    summary.py   JobSummary
    ray_job.py   the same job on Ray Data (optional extra)
    openai_batch.py  OpenAI Batch JSONL input and output
"""

from terse.pipelines.docqa.config import DocQAConfig, load_config
from terse.pipelines.docqa.job import DocQAJob, JobPaths
from terse.pipelines.docqa.summary import JobSummary

__all__ = ["DocQAConfig", "DocQAJob", "JobPaths", "JobSummary", "load_config"]
