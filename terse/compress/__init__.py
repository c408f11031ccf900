"""terse.compress: question-aware coarse-to-fine prompt compression to an exact token budget.

    from terse.compress import Budget, PromptCompressor
    result = PromptCompressor(scorer).compress(docs, question=q, budget=Budget(rate=0.25))

See `compressor.py` for the stages and `docs/modules.md` for the module map.
"""

from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget, CompressorConfig, ProtectionPolicy
from terse.compress.layouts import parse_layout
from terse.compress.messages import CompressedMessages, MessagePolicy, MessagesReport, compress_messages
from terse.compress.rankers import Ranker, register_ranker
from terse.compress.recover import recover
from terse.compress.result import CompressionResult, ContextReport, KeptSpan
from terse.compress.tokenizer import TargetTokenizer, load_target_tokenizer, target_tokenizer_of

__all__ = [
    "Budget",
    "CompressedMessages",
    "CompressionResult",
    "CompressorConfig",
    "ContextReport",
    "KeptSpan",
    "MessagePolicy",
    "MessagesReport",
    "PromptCompressor",
    "ProtectionPolicy",
    "Ranker",
    "TargetTokenizer",
    "compress_messages",
    "load_target_tokenizer",
    "parse_layout",
    "recover",
    "register_ranker",
    "target_tokenizer_of",
]
