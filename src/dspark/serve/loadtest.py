"""Load generator for an OpenAI-compatible server: at each concurrency level C, keep C requests in
flight until `requests_per_level` have finished, and measure

- aggregate tok/s: completion tokens of the level / its wall time (what the server delivers),
- per-user tok/s: median over requests of completion tokens / request time (what one user sees),
- mean time to first token (streaming only: arrival of the first non-empty text piece).

Failed requests are counted and excluded from the rates. Reports: JSON, Markdown and a PNG with one
line per labelled run (e.g. one per verification policy).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from dspark.errors import DSparkError

DEFAULT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works and when its operations become slow.",
    "List five practical tips for writing clear technical documentation.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarise the causes of the French Revolution in a few sentences.",
    "Describe the water cycle to a ten-year-old.",
)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one_request(client, url: str, payload: dict, stream: bool, chat: bool) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        if not stream:
            response = await client.post(url, json=payload)
            body = response.json()
            if response.status_code != 200:
                return {"ok": False, "error": body.get("error", {}).get("message", response.text)}
            tokens = body["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", url, json=payload) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return {"ok": False, "error": f"HTTP {response.status_code}: {text[:300]}"}
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return {"ok": False, "error": chunk["error"].get("message", str(chunk))}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for c in chunk.get("choices", []):
                        piece = c.get("delta", {}).get("content") if chat else c.get("text")
                        if piece and first is None:
                            first = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a failed request is a data point, not a crash
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return {"ok": True, "latency_s": time.perf_counter() - start, "ttft_s": first, "completion_tokens": tokens}


def _summarise(concurrency: int, records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    per_user = [r["completion_tokens"] / r["latency_s"] for r in ok if r["latency_s"] > 0]
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    latencies = [r["latency_s"] for r in ok]
    errors = [r["error"] for r in records if not r["ok"]]
    return {
        "concurrency": concurrency, "requests": len(records), "errors": len(errors),
        "first_error": errors[0] if errors else None, "completion_tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 else 0.0,
        "per_user_tok_s": statistics.median(per_user) if per_user else 0.0,
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else None,
        "p50_latency_s": _quantile(latencies, 0.5), "p90_latency_s": _quantile(latencies, 0.9),
    }


async def loadtest_async(
    url: str, concurrencies: list[int], prompts: list[str], max_tokens: int, requests_per_level: int,
    api_key: str | None = None, *, stream: bool = True, chat: bool = False, model: str | None = None,
    temperature: float = 0.0, ignore_eos: bool = False, warmup: int = 1, timeout: float = 600.0,
) -> dict:
    """The coroutine behind `run_loadtest` (use it when an event loop is already running)."""
    import httpx

    if not prompts:
        raise DSparkError("the load test needs at least one prompt")
    if not concurrencies or any(c < 1 for c in concurrencies):
        raise DSparkError(f"concurrency levels must be positive integers, got {concurrencies}")
    if requests_per_level < 1 or max_tokens < 1:
        raise DSparkError("requests_per_level and max_tokens must be positive")
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrencies) + 4)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        if model is None:
            try:
                listing = await client.get(f"{base}/v1/models")
            except httpx.HTTPError as err:
                raise DSparkError(f"could not reach the server at {base}: {type(err).__name__}: {err}") from None
            if listing.status_code != 200:
                raise DSparkError(f"{base}/v1/models answered {listing.status_code}: {listing.text[:300]}")
            model = listing.json()["data"][0]["id"]
        endpoint = f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"

        def payload(i: int) -> dict:
            prompt = prompts[i % len(prompts)]
            body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": stream,
                    "ignore_eos": ignore_eos, "seed": i}
            body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            if stream:
                body["stream_options"] = {"include_usage": True}
            return body

        for i in range(warmup):
            await _one_request(client, endpoint, payload(i), stream, chat)
        levels = []
        for concurrency in concurrencies:
            records: list[dict] = []
            jobs = iter(range(requests_per_level))

            async def worker(jobs, records) -> None:
                for i in jobs:  # the shared iterator hands each job to one worker
                    records.append(await _one_request(client, endpoint, payload(i), stream, chat))

            start = time.perf_counter()
            await asyncio.gather(*(worker(jobs, records) for _ in range(concurrency)))
            levels.append(_summarise(concurrency, records, time.perf_counter() - start))
    return {"url": base, "model": model, "label": None, "stream": stream, "chat": chat, "max_tokens": max_tokens,
            "requests_per_level": requests_per_level, "temperature": temperature, "levels": levels}


def run_loadtest(
    url: str, concurrencies: list[int], prompts: list[str], max_tokens: int, requests_per_level: int,
    api_key: str | None = None, **options,
) -> dict:
    """Run every concurrency level in turn; returns {"levels": [per-level summary], ...settings}.
    Options: stream (True), chat (False), model (asked from /v1/models), temperature (0),
    ignore_eos (False: set it for equal lengths across runs), warmup (1 request), timeout (s)."""
    return asyncio.run(loadtest_async(url, concurrencies, prompts, max_tokens, requests_per_level, api_key, **options))


def load_loadtest_results(out_dir: str | Path) -> list[dict]:
    """Single-run results (JSON objects with "levels") found in a folder, sorted by label."""
    runs = []
    for path in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "levels" in data:
            runs.append(data)
    return sorted(runs, key=lambda r: str(r.get("label")))


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(runs: list[dict]) -> str:
    lines = ["# Load test", ""]
    for run in runs:
        mode = "streaming" if run["stream"] else "non-streaming"
        lines += [f"## {run.get('label')}", "",
                  (f"{run['url']}, model {run['model']}, max_tokens {run['max_tokens']}, {mode}, "
                   f"{run['requests_per_level']} requests per level"), "",
                  "| concurrency | requests | errors | aggregate tok/s | per-user tok/s | mean TTFT (s) | p50 latency (s) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for lv in run["levels"]:
            lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {_fmt(lv['aggregate_tok_s'])} | "
                         f"{_fmt(lv['per_user_tok_s'])} | {_fmt(lv['mean_ttft_s'], 3)} | {_fmt(lv['p50_latency_s'], 3)} |")
        lines.append("")
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        xs = [lv["concurrency"] for lv in run["levels"]]
        axes[0].plot(xs, [lv["aggregate_tok_s"] for lv in run["levels"]], marker="o", label=str(run.get("label")))
        axes[1].plot(xs, [lv["per_user_tok_s"] for lv in run["levels"]], marker="o", label=str(run.get("label")))
    levels = sorted({lv["concurrency"] for run in runs for lv in run["levels"]})
    for ax, title in zip(axes, ("aggregate tok/s", "per-user tok/s (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_loadtest_report(results: dict | list[dict], out_dir: str | Path, label: str) -> dict[str, Path]:
    """Write {label}.json, {label}.md and {label}.png into out_dir. One result is labelled `label`;
    a list keeps each run's own label and draws all of them on one plot (label names the files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(results, dict):
        results = dict(results, label=label)
        runs = [results]
    else:
        runs = [dict(r, label=r.get("label") or f"run {i}") for i, r in enumerate(results)]
        results = runs
    paths = {"json": out / f"{label}.json", "markdown": out / f"{label}.md", "png": out / f"{label}.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(_markdown(runs))
    _plot(runs, paths["png"])
    return paths
