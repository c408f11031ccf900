"""The OpenAI Batch JSONL line format as an alternative input and output of a doc-QA job.

Input: one request per line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {"model", "messages", "metadata"?}}`. The question is the last user message; `body.metadata`
may carry `doc_ids` (a list, or a comma-separated string as the Batch API's string-only metadata
requires) and a gold `answer`.

Output: one result per answered question, `{"id", "custom_id", "response": {"status_code": 200,
"request_id", "body": <chat.completion object with usage>}, "error": null}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from terse.errors import InvalidRequestError
from terse.pipelines.docqa.inputs import json_line, text_lines
from terse.pipelines.docqa.journal import JsonlJournal


def batch_request_to_question(data: dict[str, Any], path: Path, line_no: int) -> dict[str, Any]:
    """One Batch API request line as a questions-file record; errors name the file and line."""
    where = f"{path}:{line_no}"
    custom_id = data.get("custom_id")
    body = data.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequestError(f"{where}: 'custom_id' must be a non-empty string")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise InvalidRequestError(f"{where}: 'body.messages' must be a list of chat messages")
    users = [m.get("content") for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise InvalidRequestError(f"{where}: no user message with text content to take the question from")
    metadata = body.get("metadata") or {}
    doc_ids = metadata.get("doc_ids", [])
    if isinstance(doc_ids, str):
        doc_ids = [d.strip() for d in doc_ids.split(",") if d.strip()]
    record: dict[str, Any] = {"id": custom_id, "question": users[-1], "doc_ids": doc_ids}
    if metadata.get("answer") is not None:
        record["answer"] = metadata["answer"]
    return record


def convert_batch_input(path: Path, questions_path: Path) -> Path:
    """Write the questions file equivalent to a Batch API input file; returns `questions_path`."""
    if not path.is_file():
        raise InvalidRequestError(f"batch input {str(path)!r} does not exist")
    lines: list[str] = []
    for line_no, line in text_lines(path, "batch input"):
        if line.strip():
            record = batch_request_to_question(json_line(line, path, line_no), path, line_no)
            lines.append(json.dumps(record, ensure_ascii=False))
    questions_path.parent.mkdir(parents=True, exist_ok=True)
    questions_path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return questions_path


def batch_output_line(answer: dict[str, Any], model: str) -> dict[str, Any]:
    """One answers-file record as a Batch API output line."""
    usage = answer["usage"]
    body = {
        "id": f"chatcmpl-{answer['id']}",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": answer["answer"]}}],
        "usage": {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
        },
    }
    return {
        "id": f"batch_req_{answer['id']}",
        "custom_id": answer["id"],
        "response": {"status_code": 200, "request_id": f"req_{answer['id']}", "body": body},
        "error": None,
    }


def write_batch_output(answers_path: Path, output_path: Path, *, model: str) -> int:
    """Rewrite every answer of `answers_path` into `output_path` in Batch output format; returns lines."""
    records = JsonlJournal(answers_path).records
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(batch_output_line(r, model)) + "\n" for r in records), encoding="utf-8")
    tmp.replace(output_path)
    return len(records)
