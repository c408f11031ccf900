"""Thin adapters that put terse inside other frameworks, each behind its optional extra:

- `terse.integrations.langchain`: `TerseCompressor` (document compressor), `TerseRetriever` (terse index)
- `terse.integrations.llama_index`: `TerseNodePostprocessor`, `TerseIndexRetriever`
- `terse.integrations.litellm`: `TerseHook` (compresses chat requests in LiteLLM's SDK and proxy)

Each module imports its framework; this package imports none, so terse works without them.
"""
