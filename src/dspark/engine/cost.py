"""The cost table: steps per second SPS(B) of one target verification forward over B tokens.

The hardware-aware scheduler (paper §3.2.2) trades expected accepted tokens against the time of a
bigger verification batch; this table is the only thing it knows about the hardware. It is
profiled once per machine and target (`dspark.engine.profile.profile_target`), stored as JSON, and
looked up in O(log n) per candidate.

Between profiled points the *time per step* (1 / SPS) is interpolated linearly, because forward
time, not its inverse, is what grows roughly piecewise linearly with B. Below the first point the
first value holds; beyond the last point time is extrapolated along the last two points, with a
slope of at least zero so that time never decreases (and so never reaches zero) past the data.

B alone does not fix the cost: R requests of one token each cost more than one request of R tokens
(every row attends over its own context). A table may therefore also hold one curve per number of
requests R (`by_rows`, measured in the engine's own shape: R rows of 1 + e tokens), and a lookup
that knows R uses them: at R between two profiled counts, the two curves are read at the same
tokens per row and interpolated linearly in R; beyond the largest, that curve is scaled by R.
Without `by_rows` (e.g. SGLang's flat `sps.json`), or without R, the B-only curve is used.

An engine that pads ragged rows to the widest one also pays for part of the padding (attention
runs over the padded grid, matrix products in blocks of rows). `padding` holds, per R, the seconds
each padded token adds (measured by the profiler against the uniform-row curve); `round_time`
prices a round as t(B, R) + padding(R) * (R * width - B). A GPU engine with variable-length
attention has no such term, and a table without it prices B alone, as the paper does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dspark.errors import DSparkError

FORMAT = "dspark-cost-table"
VERSION = 1


def _interpolate(points: Sequence[tuple[int, float]], x: float, extend: bool = False) -> float:
    """Piecewise-linear value at x through (x_i, y_i) in increasing x_i: the first value below
    them; above them the last value, or with `extend` the last segment continued."""
    i = bisect_right([p for p, _ in points], x)
    if i == 0 or len(points) == 1:
        return points[0][1]
    if i == len(points) and not extend:
        return points[-1][1]
    (x1, y1), (x2, y2) = points[min(i, len(points) - 1) - 1], points[min(i, len(points) - 1)]
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


@dataclass(frozen=True)
class CostTable:
    """tokens: strictly increasing total tokens B of a verify forward; sps: steps per second at B."""

    tokens: tuple[int, ...]
    sps: tuple[float, ...]
    meta: dict = field(default_factory=dict, compare=False)  # device, target, dtype, context, ...
    # ((R, table of B -> sps measured with R rows), ...) in increasing R; empty: B-only.
    by_rows: tuple[tuple[int, CostTable], ...] = ()
    # ((R, seconds per padded token), ...) in increasing R; empty: padding is free.
    padding: tuple[tuple[int, float], ...] = ()
    # Context: the cached tokens per request the curves were measured at, and
    # ((R, (a, b)), ...) in increasing R: a round of R rows padded to `width` takes
    # a + b * (width - 1) seconds more for every cached token its longest row has beyond that
    # (attention reads every row's keys up to the longest context in the round, padded rows
    # included). Empty: the curves hold at any context.
    context: int | None = None
    context_s: tuple[tuple[int, tuple[float, float]], ...] = ()

    def __post_init__(self) -> None:
        tokens, sps = tuple(self.tokens), tuple(self.sps)
        if not tokens or len(tokens) != len(sps):
            raise DSparkError(f"a cost table needs as many sps values as token counts (at least one), "
                              f"got {len(tokens)} token counts and {len(sps)} sps values")
        for b in tokens:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise DSparkError(f"cost table token counts must be integers >= 1, got {b!r}")
        for prev, b in itertools.pairwise(tokens):
            if b <= prev:
                raise DSparkError(f"cost table token counts must be strictly increasing, got {prev} then {b}")
        for s in sps:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise DSparkError(f"cost table sps values must be finite numbers > 0, got {s!r}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "sps", tuple(float(s) for s in sps))
        object.__setattr__(self, "meta", dict(self.meta))
        by_rows = tuple(sorted((int(r), t) for r, t in dict(self.by_rows).items()))
        for r, t in by_rows:
            if r < 1 or not isinstance(t, CostTable) or t.by_rows:
                raise DSparkError(f"cost table by_rows needs row counts >= 1 with plain tables, got {r!r}")
        object.__setattr__(self, "by_rows", by_rows)
        padding = tuple(sorted((int(r), float(c)) for r, c in dict(self.padding).items()))
        for r, c in padding:
            if r < 1 or not math.isfinite(c) or c < 0:
                raise DSparkError(f"cost table padding needs row counts >= 1 and seconds >= 0, got {r!r}: {c!r}")
        object.__setattr__(self, "padding", padding)
        context_s = tuple(sorted((int(r), (float(a), float(b))) for r, (a, b) in dict(self.context_s).items()))
        for r, (a, b) in context_s:
            if r < 1 or not all(math.isfinite(x) and x >= 0 for x in (a, b)):
                raise DSparkError(f"cost table context_s needs row counts >= 1 and seconds >= 0, got {r!r}: {(a, b)!r}")
        if self.context is not None and (isinstance(self.context, bool) or not isinstance(self.context, int)
                                         or self.context < 0):
            raise DSparkError(f"cost table context must be an integer >= 0 (cached tokens), got {self.context!r}")
        if context_s and self.context is None:
            raise DSparkError("a cost table with context_s needs the context it was measured at (an integer >= 0)")
        object.__setattr__(self, "context_s", context_s)
        # Parsed once, so that malformed drafter timings are refused now, not in a simulation.
        object.__setattr__(self, "_drafter_points", self._draft_points())

    # ------------------------------------------------------------------------------------ lookups
    def time_at(self, tokens: float, rows: int | None = None) -> float:
        """Seconds per verification step with `tokens` tokens in the batch over `rows` requests
        (always > 0); rows=None, or a table without per-row curves, reads the B-only curve."""
        if rows is not None and self.by_rows:
            return self._time_with_rows(tokens, rows)
        xs, sps = self.tokens, self.sps
        if tokens <= xs[0]:
            return 1.0 / sps[0]
        if tokens >= xs[-1]:
            if len(xs) == 1:
                return 1.0 / sps[-1]
            slope = max(0.0, (1.0 / sps[-1] - 1.0 / sps[-2]) / (xs[-1] - xs[-2]))
            return 1.0 / sps[-1] + slope * (tokens - xs[-1])
        i = bisect_right(xs, tokens)  # xs[i - 1] <= tokens < xs[i]
        w = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return (1.0 - w) / sps[i - 1] + w / sps[i]

    def _time_with_rows(self, tokens: float, rows: int) -> float:
        per_row = tokens / rows
        counts = [r for r, _ in self.by_rows]
        i = bisect_right(counts, rows)  # counts[i - 1] <= rows < counts[i]
        if i == 0:
            return self.by_rows[0][1].time_at(per_row * counts[0])
        r1, t1 = self.by_rows[i - 1]
        if r1 == rows:
            return t1.time_at(tokens)
        if i == len(counts):
            return t1.time_at(per_row * r1) * rows / r1
        r2, t2 = self.by_rows[i]
        w = (rows - r1) / (r2 - r1)
        return (1.0 - w) * t1.time_at(per_row * r1) + w * t2.time_at(per_row * r2)

    def pad_at(self, rows: int) -> float:
        """Seconds one padded token adds to a round of `rows` requests (0 without padding data);
        linear in R between profiled counts, the nearest count's value outside them."""
        return _interpolate(self.padding, rows) if self.padding else 0.0

    def context_at(self, rows: int, width: int, context: int | None) -> float:
        """Seconds a round of `rows` rows padded to `width` gains (or, below the profiled context,
        loses) when its longest context holds `context` cached tokens (0 without context data or
        context). Per request: linear in R between profiled counts, the nearest count's outside."""
        if context is None or not self.context_s:
            return 0.0
        a = _interpolate([(r, ab[0] / r) for r, ab in self.context_s], rows)
        b = _interpolate([(r, ab[1] / r) for r, ab in self.context_s], rows)
        return rows * (a + b * max(0, width - 1)) * (context - self.context)

    def round_time(self, tokens: float, rows: int, width: int, context: int | None = None) -> float:
        """Seconds of a verify round of `tokens` real tokens in `rows` rows padded to `width`, the
        longest row over `context` cached tokens (None: the profiled context)."""
        base = self.time_at(tokens, rows) + self.pad_at(rows) * max(0.0, rows * width - tokens)
        return max(base + self.context_at(rows, width, context), 0.1 * base)  # far below it: keep a floor

    def _draft_points(self) -> list[tuple[int, float]]:
        """meta["drafter_propose_s"] as sorted (R, seconds), validated; empty when absent."""
        measured = self.meta.get("drafter_propose_s")
        if not measured:
            return []
        try:
            points = sorted((int(r), float(s)) for r, s in dict(measured).items())
        except (TypeError, ValueError):
            raise DSparkError(f"cost table meta 'drafter_propose_s' must map request counts to seconds, "
                              f"got {measured!r}") from None
        counts = [r for r, _ in points]
        if any(r < 1 or not math.isfinite(s) or s < 0 for r, s in points) or len(set(counts)) != len(counts):
            raise DSparkError(f"cost table meta 'drafter_propose_s' needs distinct counts >= 1 and seconds >= 0, "
                              f"got {measured!r}")
        return points

    def draft_time(self, rows: int) -> float | None:
        """Seconds of one drafting round for `rows` requests, from the profile's drafter timing
        (meta["drafter_propose_s"], `dspark profile --drafter`); None when it has none. Linear in R
        between profiled counts and along the last two beyond them; the nearest below them (a
        single count: its value at every R)."""
        points = self._drafter_points
        return max(0.0, _interpolate(points, rows, extend=True)) if points else None

    def sps_at(self, tokens: float, rows: int | None = None) -> float:
        """Steps per second SPS(B) (over `rows` requests when the table has per-row curves);
        exactly the stored value at a profiled point."""
        if rows is not None and self.by_rows:
            return 1.0 / self._time_with_rows(tokens, rows)
        i = bisect_right(self.tokens, tokens) - 1
        if i >= 0 and self.tokens[i] == tokens:
            return self.sps[i]
        return 1.0 / self.time_at(tokens)

    def with_draft_time(self, seconds: float) -> CostTable:
        """This table with one drafting round costing `seconds` at every request count, in place of
        its drafter timing (meta["drafter_propose_s"])."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise DSparkError(f"a drafting round's time must be a finite number of seconds >= 0, got {seconds!r}")
        return replace(self, meta={**self.meta, "drafter_propose_s": {"1": float(seconds)}})

    # --------------------------------------------------------------------------------- builders
    @classmethod
    def flat(cls, sps: float = 1.0, **meta) -> CostTable:
        """Constant cost: a verification step takes the same time whatever B (verify-all is optimal
        for every draft with a positive survival probability)."""
        return cls((1,), (float(sps),), {"kind": "flat", **meta})

    @classmethod
    def gpu_shaped(cls, knee: int = 64, base_ms: float = 20.0, ms_per_token: float = 0.25,
                   max_tokens: int | None = None, **meta) -> CostTable:
        """SYNTHETIC, for simulation only: constant time per step up to `knee` tokens, then growing
        linearly by `ms_per_token` — the shape of a GPU forward that is memory-bound (weights
        streamed once per step) until the batch saturates compute. Not a measurement."""
        if knee < 1 or base_ms <= 0 or ms_per_token < 0:
            raise DSparkError(f"gpu_shaped needs knee >= 1, base_ms > 0, ms_per_token >= 0; "
                              f"got {knee}, {base_ms}, {ms_per_token}")
        top = max(max_tokens or 4 * knee, knee + 1)
        points = sorted({1, knee, top})
        times = [base_ms + ms_per_token * max(0, b - knee) for b in points]
        return cls(tuple(points), tuple(1000.0 / t for t in times),
                   {"kind": "synthetic-gpu-shaped", "knee": knee, "base_ms": base_ms,
                    "ms_per_token": ms_per_token, **meta})

    # --------------------------------------------------------------------------------------- I/O
    def to_json(self) -> dict:
        out = {"format": FORMAT, "version": VERSION, "tokens": list(self.tokens), "sps": list(self.sps),
               "meta": self.meta}
        if self.by_rows:
            out["by_rows"] = {str(r): {"tokens": list(t.tokens), "sps": list(t.sps)} for r, t in self.by_rows}
        if self.padding:
            out["padding_s"] = {str(r): c for r, c in self.padding}
        if self.context is not None:
            out["context"] = self.context
        if self.context_s:
            out["context_s"] = {str(r): list(ab) for r, ab in self.context_s}
        return out

    @classmethod
    def from_json(cls, data: object, source: str = "cost table") -> CostTable:
        """Our format, or SGLang's `{"sample_batch_tokens": [...], "sample_steps_per_sec": [...]}`."""
        if not isinstance(data, dict):
            raise DSparkError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "sample_batch_tokens" in data and "tokens" not in data:
            tokens, sps, meta = data["sample_batch_tokens"], data.get("sample_steps_per_sec"), {"from": "sglang"}
        else:
            fmt = data.get("format")
            if fmt != FORMAT:
                raise DSparkError(f"{source}: 'format' is {fmt!r}, expected {FORMAT!r}")
            if data.get("version") != VERSION:
                raise DSparkError(f"{source}: version {data.get('version')!r} is not supported (expected {VERSION})")
            tokens, sps, meta = data.get("tokens"), data.get("sps"), data.get("meta", {})
        for key, value in (("tokens", tokens), ("sps", sps)):
            if not isinstance(value, list):
                raise DSparkError(f"{source}: '{key}' must be a list, got {value!r}")
        if not isinstance(meta, dict):
            raise DSparkError(f"{source}: 'meta' must be an object, got {meta!r}")
        by_rows, padding, context_s = data.get("by_rows", {}), data.get("padding_s", {}), data.get("context_s", {})
        for key, value in (("by_rows", by_rows), ("padding_s", padding), ("context_s", context_s)):
            if not isinstance(value, dict):
                raise DSparkError(f"{source}: '{key}' must be an object, got {value!r}")
        try:
            curves = {}
            for r, curve in by_rows.items():
                if not (isinstance(r, str) and r.isdigit()) or not isinstance(curve, dict):
                    raise DSparkError(f"'by_rows' needs row counts mapped to {{tokens, sps}}, got {r!r}: {curve!r}")
                curves[int(r)] = cls.from_json({"format": FORMAT, "version": VERSION, **curve}, f"by_rows[{r}]")
            for r, c in padding.items():
                if not (isinstance(r, str) and r.isdigit()) or isinstance(c, bool) or not isinstance(c, (int, float)):
                    raise DSparkError(f"'padding_s' needs row counts mapped to seconds, got {r!r}: {c!r}")
            for r, ab in context_s.items():
                if not (isinstance(r, str) and r.isdigit()) or not isinstance(ab, list) or len(ab) != 2 or any(
                        isinstance(x, bool) or not isinstance(x, (int, float)) for x in ab):
                    raise DSparkError(f"'context_s' needs row counts mapped to [a, b] seconds, got {r!r}: {ab!r}")
            return cls(tuple(tokens), tuple(sps), meta, tuple(curves.items()),
                       tuple((int(r), float(c)) for r, c in padding.items()), data.get("context"),
                       tuple((int(r), (float(ab[0]), float(ab[1]))) for r, ab in context_s.items()))
        except DSparkError as err:
            raise DSparkError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        path = Path(path)
        if not path.is_file():
            raise DSparkError(f"cost table {str(path)!r} does not exist (write one with `dspark profile`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DSparkError(f"cost table {str(path)!r} is not valid JSON ({err.msg}, line {err.lineno})") from None
        return cls.from_json(data, source=f"cost table {str(path)!r}")
