"""Benchmark runner: several drafters on the same prompts and seeds, against plain decoding of the
same target in the same run. Resumable per (benchmark, drafter): finished pairs (with their
per-round logs) are kept in OUT/partial/ and skipped on a rerun. Writes OUT/results.json,
OUT/report.md and PNG plots.

Protocol (as DeepSpec's evaluator): first turn only, the target's chat template, no system prompt
added, every drafted token verified (no confidence cut), prompt i seeded with 980406 + i, tau
includes the bonus token, batch 1 unless --batch-size says otherwise (wall-clock speedups are
measured at the batch size used).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.data.prompts import read_prompts
from dspark.engine.engine import Engine, Request
from dspark.errors import DSparkError
from dspark.eval.calibration import calibration_metrics, survival_samples, threshold_sweep
from dspark.eval.metrics import summarize_rounds
from dspark.eval.report import report_markdown
from dspark.text import encode_messages

SEED = 980406
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))
# Benchmark file stem -> domain (paper Table 1's grouping); unknown stems fall back by prefix, then "other".
DOMAINS = {
    "gsm8k": "math", "math": "math", "math500": "math", "aime": "math", "aime24": "math", "aime25": "math",
    "humaneval": "code", "mbpp": "code", "livecodebench": "code", "lcb": "code", "swe-bench": "code",
    "mt-bench": "chat", "mt_bench": "chat", "alpaca": "chat", "arena-hard": "chat",
}


def domain_of(stem: str) -> str:
    stem = stem.lower()
    if stem in DOMAINS:
        return DOMAINS[stem]
    for prefix, domain in DOMAINS.items():
        if stem.startswith(prefix):
            return domain
    return "other"


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0
    block_size: int = 7
    max_new_tokens: int = 256
    limit: int | None = None
    batch_size: int = 1
    thresholds: tuple[float, ...] = field(default=THRESHOLDS)
    # Verification policy (dspark generate's --policy): fixed verifies every draft (the drafter's own
    # tau, as DeepSpec's evaluator measures it); auto is what `dspark generate` and `serve` do.
    policy: str = "fixed"


def benchmark_files(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return files


def run_pair(target, drafter, prompt_ids: list[list[int]], cfg: EvalConfig, desc: str) -> dict:
    """One drafter over one benchmark: metrics plus the raw per-round logs (kept for pooling)."""
    from dspark.engine.policy_spec import resolve_policy

    max_len = max(map(len, prompt_ids)) + cfg.max_new_tokens
    engine = Engine(target, drafter, EngineConfig(block_size=cfg.block_size, max_batch_size=cfg.batch_size, max_seq_len=max_len))
    policy = resolve_policy(cfg.policy, target, drafter, engine.config, cached=True)  # a fresh state per pair
    rounds: list = []
    confidences: list = []
    tokens, seconds = 0, 0.0
    bar = tqdm(total=len(prompt_ids), desc=desc, unit="prompt", leave=False)
    for start in range(0, len(prompt_ids), cfg.batch_size):
        batch = [Request(ids, SamplingParams(cfg.temperature, seed=SEED + start + j), StopParams(cfg.max_new_tokens), request_id=start + j)
                 for j, ids in enumerate(prompt_ids[start : start + cfg.batch_size])]
        t0 = time.perf_counter()
        outs = engine.generate(batch, policy)
        seconds += time.perf_counter() - t0
        for out in sorted(outs, key=lambda o: o.request_id):
            rounds.extend(out.stats.round_log)
            confidences.extend(out.stats.confidence_log)
            tokens += out.stats.num_generated
        bar.update(len(batch))
    bar.close()
    temps = list(getattr(drafter, "confidence_temperatures", ()) or ())
    return {**summarize_rounds(rounds, cfg.block_size), "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds else 0.0,
            "logs": {"rounds": rounds, "confidences": confidences, "temperatures": temps}}


def _confidence_results(logs: dict, cfg: EvalConfig) -> dict | None:
    """Calibration as served (and before calibration, when temperatures were applied) + threshold sweep."""
    samples = survival_samples(logs["rounds"], logs["confidences"], cfg.block_size, logs["temperatures"])
    if len(samples) == 0:
        return None
    temps = logs["temperatures"] or None
    out = {"calibration": calibration_metrics(samples, temps),
           "threshold_sweep": threshold_sweep(samples, cfg.thresholds, temps)}
    if temps:
        out["calibration_before"] = calibration_metrics(samples)
    return out


def drafter_labels(names: list[str]) -> dict[str, str]:
    """Short, unique labels for drafter names: a folder's basename, or its whole path (with '/' as
    '_') when two folders share a basename."""
    short = {n: Path(n).name or n for n in names}
    clashing = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {n: ("_".join(Path(n).parts).lstrip("_") if short[n] in clashing else short[n]) for n in names}


def _check_resumable(out: Path, cfg: EvalConfig) -> None:
    """OUT keeps the config its partial results were made with; another config is refused rather
    than silently mixed with them."""
    file = out / "eval_config.json"
    current = json.loads(json.dumps(asdict(cfg)))
    if file.is_file():
        previous = {"policy": "fixed", **json.loads(file.read_text())}  # folders from before --policy
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise DSparkError(f"{out} holds results made with other settings ({', '.join(changed)}: "
                              f"{[previous.get(k) for k in changed]} there, {[current[k] for k in changed]} now); "
                              "use another --out, or delete it to start over")
    else:
        file.write_text(json.dumps(current, indent=2))


def run_eval(target, drafters: dict, benchmarks: list[str], out_dir, cfg: EvalConfig, plots: bool = True) -> dict:
    """drafters: name -> Drafter (the name 'none' is run as the baseline if absent)."""
    from dspark.drafters.simple import NoDrafter

    out = Path(out_dir)
    (out / "partial").mkdir(parents=True, exist_ok=True)
    _check_resumable(out, cfg)
    runs = {"none": NoDrafter(), **drafters}
    labels = drafter_labels(list(runs))
    results: dict = {"config": asdict(cfg), "benchmarks": {}, "domains": {}}
    pooled: dict[tuple[str, str], dict] = {}
    for file in benchmark_files(benchmarks):
        prompts = read_prompts([file])[: cfg.limit]
        ids = [encode_messages(target.tokenizer, list(p.messages)) for p in prompts]
        bench = results["benchmarks"].setdefault(file.stem, {"prompts": len(ids), "domain": domain_of(file.stem), "drafters": {}})
        for name, drafter in runs.items():
            label = labels[name]
            partial = out / "partial" / f"{file.stem}__{label}.json"
            if partial.is_file():
                pair = json.loads(partial.read_text())
            else:
                pair = run_pair(target, drafter, ids, cfg, f"{file.stem} / {label}")
                tmp = partial.with_suffix(".tmp")
                tmp.write_text(json.dumps(pair))
                os.replace(tmp, partial)
            logs = pair.pop("logs")
            extra = _confidence_results(logs, cfg)
            if extra:
                pair.update(extra)
            bench["drafters"][label] = pair
            pool = pooled.setdefault((bench["domain"], label), {"rounds": [], "confidences": [], "temperatures": logs["temperatures"]})
            pool["rounds"] += logs["rounds"]
            pool["confidences"] += logs["confidences"]
        base = bench["drafters"]["none"]["tokens_per_second"]
        for pair in bench["drafters"].values():
            pair["speedup_vs_plain"] = pair["tokens_per_second"] / base if base else math.nan
    for (domain, label), logs in pooled.items():
        entry = {**summarize_rounds(logs["rounds"], cfg.block_size)}
        extra = _confidence_results(logs, cfg)
        if extra:
            entry["threshold_sweep"] = extra["threshold_sweep"]
            entry["ece_mean"] = extra["calibration"]["ece_mean"]
            entry["auroc_mean"] = extra["calibration"]["auroc_mean"]
        results["domains"].setdefault(domain, {})[label] = entry
    results["traces"] = write_traces(pooled, out)
    results["plots"] = []
    _write_results(results, out)  # first: a missing plotting library must not lose the results
    if plots:
        try:
            results["plots"] = write_plots(results, out)
        except ImportError as err:
            import warnings

            warnings.warn(f"plots skipped: {err}", stacklevel=2)
            print(f"dspark: plots skipped ({err}); results.json and report.md are written", flush=True)
        else:
            _write_results(results, out)
    return results


def _write_results(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "report.md").write_text(report_markdown(results))


def write_traces(pooled: dict, out: Path) -> list[str]:
    """OUT/traces/<drafter>.jsonl: every full-verification round, for `dspark simulate --trace`."""
    from dspark.engine.simulate import save_trace, trace_from_logs

    by_drafter: dict[str, list] = {}
    for (domain, label), logs in pooled.items():
        if label != "none":
            by_drafter.setdefault(label, []).extend(trace_from_logs(logs["rounds"], logs["confidences"], domain))
    (out / "traces").mkdir(exist_ok=True)
    for label, records in by_drafter.items():
        save_trace(records, out / "traces" / f"{label}.jsonl")
    return [f"traces/{label}.jsonl" for label in by_drafter]


def write_plots(results: dict, out: Path) -> list[str]:
    """tau per benchmark, conditional acceptance per domain, and per drafter with confidences the
    threshold sweep and reliability diagrams (first benchmark's calibration pooled by domain is in
    results.json; the diagram shows each benchmark's own)."""
    from dspark.eval import plots

    files = [plots.plot_tau({b: {d: r["accept_length"] for d, r in v["drafters"].items()}
                             for b, v in results["benchmarks"].items()}, out / "tau.png")]
    files.append(plots.plot_conditional_acceptance(
        {dom: {d: r["conditional_acceptance"] for d, r in per.items() if d != "none"} for dom, per in results["domains"].items()},
        out / "conditional_acceptance.png"))
    drafters = {d for per in results["domains"].values() for d, r in per.items() if "threshold_sweep" in r}
    for d in sorted(drafters):
        sweeps = {dom: per[d]["threshold_sweep"] for dom, per in results["domains"].items() if "threshold_sweep" in per.get(d, {})}
        files.append(plots.plot_threshold_sweep(sweeps, out / f"threshold_sweep_{d}.png", title=d))
    for bench, v in results["benchmarks"].items():
        for d, r in v["drafters"].items():
            if "calibration" in r:
                before, after = (r["calibration_before"], r["calibration"]) if "calibration_before" in r else (r["calibration"], None)
                files.append(plots.plot_reliability(before, after, out / f"reliability_{bench}_{d}.png"))
    return [str(Path(f).name) for f in files]


def calibrate_drafter(target, drafter_dir: str | Path, prompt_files: list[str], cfg: EvalConfig, plot: bool = True) -> dict:
    """Fit Sequential Temperature Scaling on held-out prompts and store calibration.json in the
    drafter folder (the engine applies it on load). Runs with raw confidences and full verification."""
    from dspark.drafters.checkpoint import load_drafter, write_calibration
    from dspark.eval.calibration import fit_sts

    drafter = load_drafter(drafter_dir, target, calibrated=False)
    if getattr(getattr(drafter, "model", None), "confidence_head", None) is None:
        raise DSparkError(f"{drafter_dir} has no confidence head (a {drafter.name} drafter); nothing to calibrate")
    block = drafter.config.block_size
    cfg = replace(cfg, block_size=block)
    files = benchmark_files(prompt_files)
    ids = [encode_messages(target.tokenizer, list(p.messages)) for f in files for p in read_prompts([f])[: cfg.limit]]
    if not ids:
        raise DSparkError(f"no prompts in {', '.join(map(str, files))}")
    logs = run_pair(target, drafter, ids, cfg, "calibrate")["logs"]
    samples = survival_samples(logs["rounds"], logs["confidences"], block)
    temps = fit_sts(samples)
    before, after = calibration_metrics(samples), calibration_metrics(samples, temps)
    calibration = {
        "method": "sts", "temperatures": temps,
        "ece_before": [p["ece"] for p in before["positions"]], "ece_after": [p["ece"] for p in after["positions"]],
        "ece_mean_before": before["ece_mean"], "ece_mean_after": after["ece_mean"],
        "auroc": [p["auroc"] for p in after["positions"]], "num_rounds": len(samples),
        "dataset": ",".join(f.stem for f in files), "sampling_temperature": cfg.temperature,
    }
    write_calibration(drafter_dir, calibration)
    if plot:
        from dspark.eval.plots import plot_reliability

        try:
            plot_reliability(before, after, Path(drafter_dir) / "calibration.png")
        except ImportError as err:  # calibration.json is written already
            print(f"dspark: calibration plot skipped ({err})", flush=True)
    return calibration
