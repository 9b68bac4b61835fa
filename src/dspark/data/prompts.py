"""Prompt readers: DeepSpec benchmark JSONL (`turns`), ShareGPT (`conversations` with from/value)
and OpenAI `messages`. Every record becomes a list of chat messages; regeneration answers the first
user turn (as DeepSpec does)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import DSparkError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class PromptRecord:
    id: str  # "<file stem>:<line number>", stable across runs (resume keys on it)
    messages: tuple[dict, ...]  # the conversation up to and including the first user turn

    @property
    def first_user_turn(self) -> str:
        return next(m["content"] for m in self.messages if m["role"] == "user")


def _messages_of(row: dict, where: str) -> list[dict]:
    if isinstance(row.get("turns"), list) and row["turns"]:
        return [{"role": "user", "content": str(row["turns"][0])}]
    if isinstance(row.get("conversations"), list):
        msgs = []
        for turn in row["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise DSparkError(f"{where}: ShareGPT role {turn.get('from')!r} is not one of {sorted(SHAREGPT_ROLES)}")
            msgs.append({"role": role, "content": str(turn.get("value", ""))})
        return msgs
    if isinstance(row.get("messages"), list):
        return [{"role": m["role"], "content": str(m.get("content", ""))} for m in row["messages"]]
    raise DSparkError(f"{where}: expected 'turns' (DeepSpec), 'conversations' (ShareGPT) or 'messages' (OpenAI)")


def read_prompts(paths: list[str | Path]) -> list[PromptRecord]:
    """Read prompt files (or folders of *.jsonl) in order; each record keeps up to its first user turn."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise DSparkError(f"prompt file {str(raw)!r} does not exist")
    records = []
    for file in files:
        for number, line in enumerate(file.read_text().split("\n"), 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DSparkError(f"{where} is not valid JSON ({err.msg})") from None
            msgs = _messages_of(row, where)
            first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if first_user is None:
                raise DSparkError(f"{where} has no user turn")
            records.append(PromptRecord(f"{file.stem}:{number}", tuple(msgs[: first_user + 1])))
    if not records:
        raise DSparkError(f"no prompts found in {[str(p) for p in paths]}")
    return records
