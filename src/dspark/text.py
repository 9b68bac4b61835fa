"""The text edge: prompts to token ids (optionally through the chat template), stop strings, decoding.

The engine sees token ids only; everything that needs the tokenizer lives here.
"""

from __future__ import annotations

from dspark.errors import DSparkError


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt; with `chat`, the user turn rendered by the tokenizer's chat template."""
    if not chat:
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_messages(tokenizer, messages)


def render_messages(tokenizer, messages: list[dict]) -> str:
    """A conversation rendered by the chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise DSparkError("the tokenizer has no chat template; drop --chat")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of `render_messages`' text: the template already wrote any special tokens it wants."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the chat template, ending with the assistant header."""
    return encode_rendered(tokenizer, render_messages(tokenizer, messages))


class StopStrings:
    """stop_checker for the engine: True once the decoded generation contains a stop string.

    Only the tail is decoded each time (enough tokens to cover the longest stop string), so the
    check costs O(len(stop)) per round, not O(generated).
    """

    def __init__(self, tokenizer, stops: list[str]):
        if any(not s for s in stops):
            raise DSparkError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.window = 8 + max(len(s) for s in stops)  # a token is at least one character

    def __call__(self, generated_ids: list[int]) -> bool:
        tail = self.tokenizer.decode(generated_ids[-self.window :], skip_special_tokens=False)
        return any(s in tail for s in self.stops)


def decode_output(tokenizer, token_ids: list[int], eos_ids: tuple[int, ...], stops: list[str]) -> str:
    """Generated text without a final stop token, cut before the first stop string (OpenAI semantics)."""
    if token_ids and token_ids[-1] in eos_ids:
        token_ids = token_ids[:-1]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text
