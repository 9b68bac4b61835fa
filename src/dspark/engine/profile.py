"""Measure the cost table SPS(B) of a target's verification forward on this machine.

A verify forward of B tokens is what the engine runs each round: ragged rows of 1 + l_r tokens
(at most block_size + 1), one per request, each over its own cached context. We time exactly that
call — `target.model(ids, positions, slots, cache, num_new=..., hidden_layers=...)` on a cache from
`target.build_cache` — with rows of `context` cached tokens, after a warm-up, and keep the median
of a few repeats. The B-only curve packs B tokens into the fewest rows; with `rows`, each request
count R also gets its own curve in the engine's shape, R rows of 1 + e tokens for e = 0..block_size
(`CostTable.by_rows`), and the cost of a padded token (`CostTable.padding`): one row of
block_size + 1 tokens next to R - 1 rows of one, against the uniform curve at the same B; and what
a longer context adds (`CostTable.context_s`): R rows of one and of block_size + 1 tokens timed
again over a second, longer context. The optional drafter cost (one `propose` for R requests) goes
into `meta`.

`cached_profile` keeps profiles as JSON in the user cache directory (`profiles/` under
$DSPARK_CACHE_DIR, else $XDG_CACHE_HOME/dspark or ~/.cache/dspark), keyed by this machine, the
target's weights and dtype and the profiling settings, so that a restarted server reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from dspark.config import SamplingParams
from dspark.drafters.base import Drafter, DraftRequest
from dspark.engine.cost import CostTable
from dspark.errors import DSparkError
from dspark.models.llama import native_bf16_matmul
from dspark.models.loading import cache_dir
from dspark.models.target import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_ROWS = 16  # context prefill in chunks of rows, so large batches do not need all logits at once
CACHE_VERSION = 1  # bump when a cached table no longer means what profile_target measures
T = TypeVar("T")
# run(fn) calls fn (the target's forwards of one measurement) and returns its result; a server
# passes one that runs fn between its decode steps (AsyncEngine.call_between_steps).
Run = Callable[[Callable[[], T]], T]


def even_rows(num_tokens: int, block_size: int) -> list[int]:
    """Split B tokens into the fewest rows of at most block_size + 1 tokens, lengths within one."""
    width = block_size + 1
    rows = -(-num_tokens // width)
    base, extra = divmod(num_tokens, rows)
    return [base + 1] * extra + [base] * (rows - extra)


def convex_times(tokens: Sequence[int], seconds: Sequence[float]) -> list[float]:
    """The greatest convex minorant of measured (B, seconds), made non-decreasing.

    Measured times wiggle by a few percent; Algorithm 1's early stop halts at the first admission
    that does not pay, so a bump in the table stops it short, and with a time per step that is
    non-decreasing and convex in B the early stop finds the global best prefix (scheduler.py). The
    lower convex hull keeps every point that is already on it and lowers bumps to it.
    """
    hull: list[int] = []  # indices of the lower hull, left to right
    for i in range(len(tokens)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: drop it
            if (seconds[b] - seconds[a]) * (tokens[i] - tokens[a]) >= (seconds[i] - seconds[a]) * (tokens[b] - tokens[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    out = []
    for b in tokens:
        j = max(k for k in range(len(hull)) if tokens[hull[k]] <= b)
        if tokens[hull[j]] == b:
            out.append(seconds[hull[j]])
        else:
            lo, hi = hull[j], hull[j + 1]
            w = (b - tokens[lo]) / (tokens[hi] - tokens[lo])
            out.append((1 - w) * seconds[lo] + w * seconds[hi])
    for i in range(1, len(out)):  # a falling start becomes flat: still convex, never faster with more tokens
        out[i] = max(out[i], out[i - 1])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def device_name(device: torch.device) -> str:
    """The device as cost tables and reports name it: GPU model, or CPU with its vector and bf16 units."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    # The vector unit and bf16 matrix units change what a block costs several-fold (AVX2 CPUs
    # emulate bf16 products), and platform.processor() is often empty on Linux: name them.
    units = torch.backends.cpu.get_cpu_capability() + (" bf16-units" if native_bf16_matmul(device) else "")
    return f"{device.type}:{platform.processor() or platform.machine()} {units} ({torch.get_num_threads()} threads)"


@torch.inference_mode()
def profile_target(
    target: LoadedModel,
    batch_tokens: Sequence[int] = DEFAULT_BATCH_TOKENS,
    context: int = 256,
    repeats: int = 5,
    rows_of: Callable[[int], list[int]] | None = None,
    block_size: int = 8,
    warmup: int = 2,
    feature_layers: tuple[int, ...] | None = None,
    drafter: Drafter | None = None,
    drafter_requests: Sequence[int] = (1,),
    seed: int = 0,
    rows: Sequence[int] = (),
    convex: bool = True,
    run: Run | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CostTable:
    """SPS(B) for each B in `batch_tokens` (sorted, deduplicated); `rows_of(B)` gives the row
    lengths (default: `even_rows(B, block_size)`). `feature_layers` are the hidden layers the
    forward also returns, as the engine asks for them (default: the drafter's, else none). With a
    `drafter`, the median time of one propose for R requests is stored in
    meta["drafter_propose_s"] for each R in `drafter_requests`. `rows`: request counts R that get
    their own curve (see the module docstring). With `convex`, each curve is stored as the convex,
    non-decreasing minorant of its measurements (`convex_times`); the raw medians stay in
    meta["measured_s"]. Every call of the target's model goes through `run` (default: called here),
    one measurement (warm-up and repeats) per call; `progress(done, total)` follows each one."""
    if drafter is not None and run is not None:
        raise DSparkError("profiling a drafter resets its slots (setup): not while it serves, so not with `run`")
    points = sorted({int(b) for b in batch_tokens})
    if not points or points[0] < 1:
        raise DSparkError(f"batch_tokens must be integers >= 1, got {list(batch_tokens)}")
    if repeats < 1 or warmup < 0 or context < 0:
        raise DSparkError(f"need repeats >= 1, warmup >= 0, context >= 0; got {repeats}, {warmup}, {context}")
    rows_of = rows_of or (lambda b: even_rows(b, block_size))
    if feature_layers is None:
        feature_layers = tuple(drafter.feature_layers) if drafter is not None else ()
    row_counts = sorted({int(r) for r in rows})
    if row_counts and row_counts[0] < 1:
        raise DSparkError(f"rows must be request counts >= 1, got {list(rows)}")
    layout = {b: rows_of(b) for b in points}
    for b, lengths in layout.items():
        if sum(lengths) != b or min(lengths) < 1:
            raise DSparkError(f"rows_of({b}) gave {lengths}: row lengths must be >= 1 and add up to {b}")
    shaped = {r: [[1 + e] * r for e in range(block_size + 1)] for r in row_counts}  # R rows of 1 + e tokens
    width_max = max([max(lengths) for lengths in layout.values()] + [block_size + 1] * bool(row_counts))
    if context + width_max > target.max_position_embeddings:
        raise DSparkError(f"context {context} + rows of {width_max} tokens exceed the target's context "
                          f"{target.max_position_embeddings}")
    # The second context for the context term: twice the first (at least 128 more), within the model.
    longer = min(max(2 * context, context + 128), target.max_position_embeddings - width_max) if row_counts else context
    device = target.model.device
    num_slots = max([len(lengths) for lengths in layout.values()] + row_counts)
    cache = target.build_cache(num_slots, longer + width_max, headroom=width_max + 2)
    gen = torch.Generator().manual_seed(seed)
    run = run or _call
    total = (len(points) + len(row_counts) * (block_size + 1) + sum(r >= 2 and block_size >= 1 for r in row_counts)
             + (len(row_counts) * len({1, block_size + 1}) if longer > context else 0))
    done = 0

    def on_model(fn: Callable[[], T]) -> T:
        # inference_mode is per thread, and `run` may call fn on another one
        return run(torch.inference_mode()(fn))

    for first in range(0, num_slots if longer else 0, PREFILL_ROWS):  # real K/V in every slot's context
        slots = torch.arange(first, min(first + PREFILL_ROWS, num_slots), device=device)
        prompt = torch.randint(0, target.vocab_size, (len(slots), longer), generator=gen).to(device)
        on_model(lambda prompt=prompt, slots=slots: target.model(
            prompt, torch.arange(longer, device=device).expand(len(slots), longer), slots, cache, last_only=True))
    spread = {}

    def seconds_per_step(lengths: list[int], label: str, at: int = context) -> float:
        # Rows over `at` cached tokens (attention reads keys below the rows' positions only; the
        # K/V they write over are the next context's, which do not change how long anything takes).
        nonlocal done
        width = max(lengths)  # rows padded to the widest one; only attention sees the padding
        ids = torch.randint(0, target.vocab_size, (len(lengths), width), generator=gen).to(device)
        positions = (at + torch.arange(width)).expand(len(lengths), width).to(device)
        slots = torch.arange(len(lengths), device=device)
        num_new = torch.tensor(lengths, device=device)

        def forward():
            return target.model(ids, positions, slots, cache, num_new=num_new, hidden_layers=feature_layers)

        times = on_model(lambda: _seconds(forward, repeats, warmup, device))
        spread[label] = [min(times), max(times)]  # a wide spread means a busy machine: profile again
        done += 1
        if progress is not None:
            progress(done, total)
        return statistics.median(times)

    def curve(tokens: list[int], seconds: list[float]) -> CostTable:
        return CostTable(tuple(tokens), tuple(1.0 / t for t in (convex_times(tokens, seconds) if convex else seconds)))

    measured = {str(b): seconds_per_step(layout[b], str(b)) for b in points}
    for r, shapes in shaped.items():
        measured.update({f"{r}x{lengths[0]}": seconds_per_step(lengths, f"{r}x{lengths[0]}") for lengths in shapes})
    table = curve(points, [measured[str(b)] for b in points])
    by_rows = {r: curve([sum(lengths) for lengths in shapes], [measured[f"{r}x{lengths[0]}"] for lengths in shapes])
               for r, shapes in shaped.items()}
    # Padding: one row of K+1 tokens and R-1 rows of one, against the uniform curve at the same B.
    padding = {}
    for r in row_counts:
        if r >= 2 and block_size >= 1:
            ragged, label = [block_size + 1] + [1] * (r - 1), f"{r}x1+{block_size}"
            measured[label] = seconds_per_step(ragged, label)
            extra = measured[label] - by_rows[r].time_at(sum(ragged))
            padding[r] = max(0.0, extra / (r * (block_size + 1) - sum(ragged)))
    # Context: per cached token more, a round of R rows of width 1 gains a; each extra column, b.
    context_s = {}
    for r in row_counts if longer > context else ():
        grow = {}
        for width in sorted({1, block_size + 1}):
            label = f"{r}x{width}@{longer}"
            measured[label] = seconds_per_step([width] * r, label, at=longer)
            grow[width] = max(0.0, (measured[label] - measured[f"{r}x{width}"]) / (longer - context))
        wide = (grow[block_size + 1] - grow[1]) / block_size if block_size else 0.0
        context_s[r] = (grow[1], max(0.0, wide))
    meta = {
        "device": device_name(device), "torch": torch.__version__, "dtype": str(target.model.dtype).removeprefix("torch."),
        "target": target.spec, "target_fingerprint": target.fingerprint, "context": context,
        "longer_context": longer,
        "block_size": block_size, "repeats": repeats, "rows": {str(b): layout[b] for b in points},
        "request_counts": row_counts, "convex": convex, "measured_s": measured,
        "seconds_min_max": spread,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if drafter is not None:
        meta["drafter"] = getattr(drafter, "name", type(drafter).__name__)
        meta["drafter_propose_s"] = profile_drafter(target, drafter, drafter_requests, context, block_size,
                                                    repeats, warmup, seed)
    return CostTable(table.tokens, table.sps, meta, tuple(by_rows.items()), tuple(padding.items()),
                     context if context_s else None, tuple(context_s.items()))


def _call(fn: Callable[[], T]) -> T:
    return fn()


def profile_cache_path(target: LoadedModel, settings: dict) -> Path:
    """Where `cached_profile` keeps the table of `target` profiled with `settings` (profile_target's
    keyword arguments): a hash of what the timings depend on, i.e. this machine (platform, CPU
    count, torch version, device: processor, vector and bf16 units, threads), the target's weights fingerprint and dtype,
    and the settings. A target at another path with the same weights shares it."""
    device = target.model.device
    key = {
        "version": CACHE_VERSION, "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "device": device_name(device),
        "target": target.fingerprint, "dtype": str(target.model.dtype), "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:24]
    return cache_dir() / "profiles" / f"{digest}.json"


def cached_profile(target: LoadedModel, run: Run | None = None, progress: Callable[[int, int], None] | None = None,
                   **settings) -> CostTable:
    """`profile_target(target, **settings)`, read from the user cache when this machine has profiled
    the same target with the same settings before, else measured and written there. A cached file
    that does not load (torn, edited, an older format) is ignored with a warning and rewritten."""
    path = profile_cache_path(target, settings)
    if path.is_file():
        try:
            table = CostTable.load(path)
            log.info("using the cost table cached at %s", path)
            return table
        except (DSparkError, OSError, ValueError) as err:  # ValueError: not UTF-8
            log.warning("ignoring the cached cost table %s, which does not load (%s); profiling again", path, err)
    table = profile_target(target, run=run, progress=progress, **settings)
    try:
        table.save(path)
        log.info("cost table cached at %s", path)
    except OSError as err:  # a read-only home still serves, it only profiles again next time
        log.warning("could not cache the cost table at %s: %s", path, err)
    return table


@torch.inference_mode()
def profile_drafter(target: LoadedModel, drafter: Drafter, requests: Sequence[int], context: int,
                    block_size: int, repeats: int = 5, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """Median seconds of one `propose` of block_size tokens for R requests of `context` tokens each."""
    device = target.model.device
    out = {}
    gen = torch.Generator().manual_seed(seed)
    context = max(context, 1)  # a request needs at least its pending token
    for num in sorted(set(requests)):
        drafter.setup(num, context + block_size + 2, block_size)
        prompts = torch.randint(0, target.vocab_size, (num, context), generator=gen)
        prefill = target.model(
            prompts[:, :-1].to(device), torch.arange(context - 1, device=device).expand(num, context - 1),
            torch.arange(num, device=device), target.build_cache(num, context, headroom=2),
            last_only=True, hidden_layers=drafter.feature_layers,
        ) if context > 1 else None
        for slot in range(num):
            features = prefill.hidden_states[slot] if prefill is not None and prefill.hidden_states is not None else None
            drafter.begin(slot, prompts[slot, :-1].tolist(), features)
        params = SamplingParams(temperature=1.0)
        reqs = [DraftRequest(slot, prompts[slot].tolist(), block_size, params, torch.Generator().manual_seed(seed + slot))
                for slot in range(num)]
        out[str(num)] = statistics.median(_seconds(lambda reqs=reqs: drafter.propose(reqs), repeats, warmup, device))
        for slot in range(num):
            drafter.release(slot)
    return out
