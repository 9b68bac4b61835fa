"""Incremental detokenization for streaming, with stop strings.

The streamed pieces of a request concatenate to exactly what `decode_output` returns for its final
tokens (what `dspark generate` prints), because
- each push decodes only a short window: tokens from `prefix` on, and the new text is what the
  window decodes to beyond its already-read part (decoding from a fixed earlier token keeps the
  tokenizer's context for leading spaces and merged characters the same for both decodes);
- text ending in U+FFFD (a multi-byte UTF-8 character split across tokens) waits for more tokens;
- text that could still be the start of a stop string is held back, and nothing from the first
  stop string on is ever sent (OpenAI semantics: the stop string is not part of the text);
- `finish` sends the rest of `decode_output` (the final eos is dropped there).
"""

from __future__ import annotations

import logging

from dspark.text import decode_output

log = logging.getLogger(__name__)


class TextStream:
    """Turns a growing list of generated token ids into text pieces safe to send."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...], stops: list[str]):
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.stops = [s for s in stops if s]
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (stable: no trailing partial character)
        self.sent = ""  # the part of `text` already handed out
        self.stopped = False  # a stop string has appeared: nothing more is sent
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens whose text is in self.text

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the new text that can be sent now (may be empty)."""
        self.token_ids.extend(new_ids)
        if self.stopped or self._read == len(self.token_ids):
            return ""
        window = self.token_ids[self._prefix :]
        read_text = self._decode(self.token_ids[self._prefix : self._read])
        full = self._decode(window)
        if len(full) > len(read_text) and not full.endswith("\ufffd"):
            self.text += full[len(read_text) :]
            self._prefix, self._read = self._read, len(self.token_ids)
        return self._release()

    def finish(self, last_ids: list[int] = ()) -> str:
        """Add the last tokens (they may end with an eos, never decoded here) and return the rest of
        the final text. Call once."""
        self.token_ids.extend(last_ids)
        final = decode_output(self.tokenizer, self.token_ids, self.eos_ids, self.stops)
        if self.stops and not self.stopped:
            self.stopped = len(final) < len(decode_output(self.tokenizer, self.token_ids, self.eos_ids, []))
        if not final.startswith(self.sent):
            # The windowed decode disagreed with the full one (a tokenizer whose decode is not
            # prefix-stable); what was sent cannot be taken back, so send nothing more.
            log.warning("streamed text diverged from the final decode; the stream ends early")
            return ""
        rest = final[len(self.sent) :]
        self.sent = final
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self) -> str:
        end = len(self.text)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            end = min(cuts)
            self.stopped = True
        else:
            end -= self._held_back()
        end = max(end, len(self.sent))
        piece = self.text[len(self.sent) : end]
        self.sent = self.text[:end]
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
