"""Answer regeneration (self-distillation): the target answers each prompt with its chat template,
and the answers become the drafter's training data.

Output: `answers.jsonl` in the output folder, one record per prompt: id, messages (the prompt turns
plus the assistant answer), num_tokens, finish_reason and the sampling parameters. Resumable: a
rerun skips ids already written and first cuts a torn last line (from a kill mid-write), so nothing
is lost or duplicated. Each prompt's seed derives from its id, so a resumed run answers as an
uninterrupted one would.

Back-ends: the local batched engine (plain decoding or lossless n-gram speculation), or any
OpenAI-compatible endpoint (vLLM, SGLang, dspark's own server) for scale.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.data.prompts import PromptRecord
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.engine.engine import Engine, Request
from dspark.errors import DSparkError
from dspark.text import decode_output, encode_messages

ANSWERS_FILE = "answers.jsonl"


@dataclass(frozen=True)
class RegenerateConfig:
    # DeepSpec's regeneration settings (non-thinking): temperature 0.7, top-p 0.8, top-k 20.
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    max_new_tokens: int = 512
    batch_size: int = 16  # plain decoding: faster than 64 in a one-off measurement (docs/training.md)
    seed: int = 0
    # Plain decoding by default: at batch 8 with T = 0.7 it measured 174 tok/s against 129 for n-gram
    # speculation here (verifying 9 tokens a row stops being nearly free once rows are batched).
    drafter: str = "none"
    # Skip prompts longer than this (0: only the model's context limit). Training truncates each
    # conversation to its max_length, so an answer to a longer prompt would be cut away unused, and
    # one long row makes every row decoded beside it attend over its length.
    max_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.drafter not in ("none", "ngram"):
            raise DSparkError(f"regeneration drafter {self.drafter!r} is not one of: none, ngram")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # validates
        if self.max_new_tokens <= 0 or self.batch_size <= 0:
            raise DSparkError(f"max_new_tokens and batch_size must be positive, got {self.max_new_tokens}, {self.batch_size}")
        if self.max_prompt_tokens < 0:
            raise DSparkError(f"max_prompt_tokens must be >= 0 (0 = the model's limit), got {self.max_prompt_tokens}")

    def sampling_for(self, record_id: str) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, seed=self.seed + zlib.crc32(record_id.encode()))


class AnswerWriter:
    """Append-only JSONL with crash safety: repairs a torn tail, skips written ids, one line per write."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ANSWERS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = self._repair_and_read()
        self._handle = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def _repair_and_read(self) -> set[str]:
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]  # drop a final line without its newline (torn write)
        done, good = set(), 0
        for line in keep.split(b"\n")[:-1]:
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                break  # a corrupt line: keep everything before it
            good += len(line) + 1
        if good < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
        return done

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._handle.write(line)
            self._handle.flush()
            self.done.add(record["id"])

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def _record(prompt: PromptRecord, text: str, num_tokens: int, finish: str, cfg: RegenerateConfig, source: str) -> dict:
    return {
        "id": prompt.id,
        "messages": list(prompt.messages) + [{"role": "assistant", "content": text}],
        "num_tokens": num_tokens,
        "finish_reason": finish,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "max_new_tokens": cfg.max_new_tokens, "seed": cfg.sampling_for(prompt.id).seed},
        "source": source,
    }


def regenerate_local(target, prompts: list[PromptRecord], out_dir, cfg: RegenerateConfig, progress: bool = True) -> dict:
    """Answer the prompts not yet in out_dir/answers.jsonl with the local engine."""
    writer = AnswerWriter(out_dir)
    todo = [p for p in prompts if p.id not in writer.done]
    tok = target.tokenizer
    limit = target.max_position_embeddings
    encoded, skipped = [], 0
    for p in todo:
        ids = encode_messages(tok, list(p.messages))
        if len(ids) + 1 > limit or (cfg.max_prompt_tokens and len(ids) > cfg.max_prompt_tokens):
            skipped += 1
            continue
        encoded.append((p, ids))
    # Longest prompts first: rows decoded together then have similar lengths, and a batch's
    # attention spans its longest row (measured: see benchmarks/bench_training.py).
    encoded.sort(key=lambda item: -len(item[1]))
    max_seq = min(limit, max((len(ids) for _, ids in encoded), default=1) + cfg.max_new_tokens)
    drafter = NgramDrafter() if cfg.drafter == "ngram" else NoDrafter()
    engine = Engine(target, drafter, EngineConfig(block_size=8, max_batch_size=cfg.batch_size, max_seq_len=max_seq))
    stop = StopParams(max_new_tokens=cfg.max_new_tokens)
    by_request = {}
    for p, ids in encoded:
        request = Request(ids, cfg.sampling_for(p.id), stop, request_id=p.id)
        by_request[p.id] = p
        engine.add_request(request)
    tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(encoded), desc="regenerate", unit="answer", disable=not progress)
    try:
        while engine.has_unfinished():
            for out in engine.step():
                text = decode_output(tok, out.token_ids, target.eos_token_ids, [])
                writer.write(_record(by_request[out.request_id], text, len(out.token_ids), out.finish_reason, cfg, target.spec))
                tokens += len(out.token_ids)
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
    finally:
        bar.close()
        writer.close()
    return {"written": len(encoded), "skipped_too_long": skipped, "already_done": len(prompts) - len(todo),
            "tokens": tokens, "seconds": time.perf_counter() - start}


def _chat_completion(endpoint: str, model: str, prompt: PromptRecord, cfg: RegenerateConfig, api_key: str | None) -> dict:
    body = {"model": model, "messages": list(prompt.messages), "temperature": cfg.temperature, "top_p": cfg.top_p,
            "top_k": cfg.top_k, "max_tokens": cfg.max_new_tokens, "seed": cfg.sampling_for(prompt.id).seed}
    request = urllib.request.Request(endpoint.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def regenerate_endpoint(endpoint: str, model: str, prompts: list[PromptRecord], out_dir, cfg: RegenerateConfig,
                        api_key: str | None = None, progress: bool = True) -> dict:
    """Answer the prompts not yet written through an OpenAI-compatible /v1/chat/completions endpoint."""
    writer = AnswerWriter(out_dir)
    todo = [p for p in prompts if p.id not in writer.done]
    tokens, start, failures = 0, time.perf_counter(), []
    bar = tqdm(total=len(todo), desc="regenerate", unit="answer", disable=not progress)

    def one(prompt: PromptRecord) -> None:
        nonlocal tokens
        try:
            reply = _chat_completion(endpoint, model, prompt, cfg, api_key)
            choice = reply["choices"][0]
            count = int(reply.get("usage", {}).get("completion_tokens", 0))
            writer.write(_record(prompt, choice["message"]["content"], count, choice.get("finish_reason") or "stop", cfg, endpoint))
            tokens += count
        except (urllib.error.URLError, KeyError, IndexError, ValueError, OSError) as err:
            failures.append(f"{prompt.id}: {err}")
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")

    try:
        with ThreadPoolExecutor(max_workers=cfg.batch_size) as pool:
            list(pool.map(one, todo))
    finally:
        bar.close()
        writer.close()
    if failures and len(failures) == len(todo):
        raise DSparkError(f"every request to {endpoint} failed, e.g. {failures[0]}")
    return {"written": len(todo) - len(failures), "failed": failures, "already_done": len(prompts) - len(todo),
            "tokens": tokens, "seconds": time.perf_counter() - start}


def read_answers(data_dir: str | Path) -> list[dict]:
    path = Path(data_dir) / ANSWERS_FILE
    if not path.is_file():
        raise DSparkError(f"{data_dir} has no {ANSWERS_FILE}; run `dspark data regenerate` first")
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]

