"""The reference model's byte-level BPE tokenizer, trained on generated text.

Byte-level BPE round-trips every string exactly. BOS is prepended to every encode (like the test
models), the chat roles and EOS "<|end|>" are single special tokens, and the chat template is the
one the shared prompt formats are rendered with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from terse.errors import ConfigError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)


def render_chat(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """`CHAT_TEMPLATE` applied in plain Python (identical output; used where jinja would be slow)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, isolate_spaces: bool = False) -> object:
    """Train and return a `PreTrainedTokenizerFast` on `texts` (bos/eos/pad set, chat template set).

    `isolate_spaces` makes every space its own token, so a word has the same tokens wherever it stands
    (at ~35% more tokens). Why it matters: with GPT-2-style "Ġword" tokens a word at the start of a line
    and the same word after a space share no first token ("N iv ielt" vs "ĠNiv ielt"); an answer that
    starts a line cannot then be copied token for token out of a document.
    """
    if not 512 <= vocab_size <= 65536:
        raise ConfigError(f"vocab_size={vocab_size} must be in [512, 65536] (4096 suits the reference model)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"), byte_level])
        if isolate_spaces
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
