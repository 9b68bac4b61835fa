"""Conversation -> token ids + loss mask over assistant tokens (DeepSpec `data/parser.py`, §4.4).

The conversation is rendered once by the tokenizer's chat template; each assistant turn's span is
found by rendering the conversation up to that turn (with the generation prompt) and through it,
and covers the answer and its end-of-turn marker. Tokens whose characters start inside a span get
loss_mask 1; everything else (system, user turns, headers) 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.errors import DSparkError


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    loss_mask: list[int]


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise DSparkError("the chat template does not render conversations as growing prefixes; cannot find assistant spans")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> TokenizedConversation:
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return TokenizedConversation(ids[:max_length], mask[:max_length])
