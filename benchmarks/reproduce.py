"""The DSpark paper's claims at small scale: DSpark, DFlash and Eagle3 trained on equal terms.

Every run trains on the same feature cache (the same answers, anchors per sequence, sequences per
step and number of optimizer steps) from one base preset; only the architecture, block size, draft
depth or head differs. Each run is then calibrated on held-out training-split prompts (drafters
with a confidence head), evaluated with `dspark eval` on the evaluation split at T = 0 and T = 1
against plain decoding (each run's own baseline, measured beside it), and its draft round timed.

    .venv/bin/python benchmarks/reproduce.py --data runs/cache --holdout runs/holdout_prompts.jsonl \\
        --benchmarks ../shared/data/eval --steps 600 --work runs/reproduce --out docs/results/reproduce

(`runs/cache` and `runs/holdout_prompts.jsonl` are made as docs/training.md shows, from the answers in
datasets/smollm2-135m-v2.) Resumable: rerun the same command after a kill or a `--time-budget`
stop; finished stages are skipped and training resumes from its newest checkpoint. `--only` runs a
subset. A new --work folder keeps the finished runs that --out's results.json reports with the same
settings, so the runs can be spread over several machines or days (rebuild the same cache first).
docs/results/reproduce/ gets results.json, report.md (the claims against their goals, the command,
versions, machine and wall time of each stage) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import dspark
from dspark.drafters.checkpoint import load_drafter
from dspark.eval.metrics import summarize_rounds
from dspark.engine.profile import device_name
from dspark.eval.runner import EvalConfig, benchmark_files, calibrate_drafter, run_eval
from dspark.models.target import load_model
from dspark.train.trainer import Trainer, TrainConfig, apply_overrides, as_dflash, get_preset

sys.path.insert(0, str(Path(__file__).parent))
from bench_drafters import draft_round_ms, target_step_ms  # noqa: E402

# name -> (architecture, drafter settings over the base preset's); the claims they serve are in claims().
RUNS = {
    "dspark-b7": ("dspark", {}),
    "dflash-b7": ("dflash", {}),
    "eagle3-b7": ("eagle3", {}),
    "dspark-b4": ("dspark", {"block_size": 4}),
    "dflash-b4": ("dflash", {"block_size": 4}),
    "dspark-b12": ("dspark", {"block_size": 12}),
    "dflash-b12": ("dflash", {"block_size": 12}),
    "dspark-1l": ("dspark", {"num_draft_layers": 1}),
    "dspark-rnn-b7": ("dspark", {"markov_head_type": "rnn"}),
}
TEMPERATURES = (0.0, 1.0)
MIN_ROUNDS = 30  # a draft position is compared (Fig. 2) only where both runs reached it this often
FINAL_STAGE = "latency"  # a run whose record has it is finished


def run_config(base: TrainConfig, arch: str, drafter: dict, steps: int) -> TrainConfig:
    """The base preset turned into `arch` (DFlash: no heads, CE only, as DeepSpec trains it; Eagle3:
    its own layer, DeepSpec's training-time test over block_size steps, supervising num_anchors rows
    per step and sequence: DSpark's num_anchors x block_size slots, where DeepSpec's every row would
    cost about 30x more per step here) with these drafter settings."""
    settings = {**base.drafter, **drafter}
    if arch == "dflash":
        cfg = as_dflash(replace(base, drafter=settings))
    elif arch == "eagle3":
        cfg = replace(base, arch="eagle3", drafter={"block_size": settings.get("block_size", 7)},
                      eagle3_rows=base.num_anchors)
    else:
        cfg = replace(base, arch="dspark", drafter=settings)
    return replace(cfg, max_steps=steps, save_every=min(base.save_every, steps))


def machine(device: torch.device) -> dict:
    """The device the target computes on (a GPU in the host changes nothing when it is the CPU)."""
    return {"device": device_name(device), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "dspark": dspark.__version__}


def measured_elsewhere(runs: dict, device: str) -> dict[str, str]:
    """Runs evaluated on another kind of machine than `device` (the thread count aside) -> that
    machine: their accept lengths compare with a new run's, their speedups and wall times do not."""
    kind = lambda name: name.rsplit(" (", 1)[0]  # noqa: E731  (device_name ends with "(N threads)")
    other = {}
    for name, run in runs.items():
        elsewhere = {kind(run[s]["machine"]["device"]) for s in ("eval_t0", "eval_t1") if s in run} - {kind(device)}
        if elsewhere:
            other[name] = ", ".join(sorted(elsewhere))
    return other


def macro(per_benchmark: dict, key: str = "accept_length") -> float:
    values = [v[key] for v in per_benchmark.values()]
    return statistics.fmean(values) if values else float("nan")


def pooled_conditional(eval_dir: Path, label: str, block: int) -> dict:
    """Conditional acceptance per draft position over every benchmark's rounds together, and how many
    rounds reached each position (every earlier draft accepted): past the first few positions a
    weak drafter's values rest on a handful of rounds."""
    rounds = []
    for partial in sorted((eval_dir / "partial").glob(f"*__{label}.json")):
        rounds += json.loads(partial.read_text())["logs"]["rounds"]
    summary = summarize_rounds(rounds, block)
    return {"conditional_acceptance": summary["conditional_acceptance"],
            "conditional_rounds": summary["position_rounds"] or [0] * block}


def backfill_rounds(runs: dict) -> bool:
    """Adds the rounds per position to evaluations recorded before they were kept, where the raw
    evaluation folder still exists. Returns whether anything was added."""
    added = False
    for name, run in runs.items():
        for stage in (f"eval_t{t:g}" for t in TEMPERATURES):
            ev = run.get(stage)
            if ev and "conditional_rounds" not in ev and (Path(ev["eval_dir"]) / "partial").is_dir():
                pooled = pooled_conditional(Path(ev["eval_dir"]), name, len(ev["conditional_acceptance"]))
                if json.dumps(pooled["conditional_acceptance"]) == json.dumps(ev["conditional_acceptance"]):  # the same rounds (nan-safe)
                    ev["conditional_rounds"] = pooled["conditional_rounds"]
                    added = True
    return added


class Reproduction:
    def __init__(self, args, command: str):
        self.args, self.command = args, command
        self.work, self.out = Path(args.work), Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_file = self.work / "state.json"
        self.settings = {"target": args.target, "base_preset": args.base_preset, "data": str(args.data),
                         "holdout": str(args.holdout), "steps": args.steps, "benchmarks": list(args.benchmarks),
                         "limit": args.limit, "max_new_tokens": args.max_new_tokens, "set": list(args.set),
                         "calibrate_limit": args.calibrate_limit}
        state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else None
        if state is not None and state["settings"] != self.settings:
            changed = sorted(k for k in self.settings if state["settings"].get(k) != self.settings[k])
            raise SystemExit(f"{self.work} holds runs made with other settings ({', '.join(changed)}); "
                             "use another --work (nothing was changed)")
        self.state = state or {"settings": self.settings, "runs": self.reported_runs()}
        if backfill_rounds(self.state["runs"]):
            self.save()
        self.target = load_model(args.target, "bf16")
        self.base = apply_overrides(get_preset(args.base_preset), args.set)

    def reported_runs(self) -> dict:
        """Finished runs of an earlier report in --out made with these settings: a new work folder
        (another machine, or checkpoints since deleted) adds runs to the report instead of redoing it."""
        file = self.out / "results.json"
        if not file.is_file():
            return {}
        report = json.loads(file.read_text())
        if report.get("settings") != self.settings:
            return {}
        done = {name: run for name, run in report["runs"].items() if name in RUNS and FINAL_STAGE in run}
        if done:
            print(f"{file}: {len(done)} finished run(s) kept ({', '.join(done)})", flush=True)
        return done

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)

    def stage(self, name: str, stage: str, fn):
        record = self.state["runs"].setdefault(name, {})
        if stage in record:
            return record[stage]
        print(f"[{name}] {stage} ...", flush=True)
        start = time.time()
        result = fn()
        if result is None:  # not finished (a time budget); the rerun continues it
            return None
        record[stage] = {**result, "seconds": round(time.time() - start, 1), "machine": machine(self.target.model.device),
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()
        return record[stage]

    def run(self, name: str, deadline: float | None) -> bool:
        arch, drafter = RUNS[name]
        cfg = run_config(self.base, arch, drafter, self.args.steps)
        run_dir = self.work / name
        record = self.state["runs"].setdefault(name, {})
        if "command" not in record:  # the invocation that started it
            record["command"] = self.command
            self.save()

        def train():
            budget = None if deadline is None else max(deadline - time.monotonic(), 1.0)
            trainer = Trainer(self.target, cfg, self.args.data, run_dir / "train")
            final = trainer.run(time_budget_s=budget)
            if trainer.step < trainer.total_steps:
                return None
            log = [json.loads(line) for line in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
            step_s = sum(m.get("seconds", 0.0) for m in log)  # every invocation's steps (a resumed run too)
            return {"drafter": str(final), "steps": trainer.step, "tokens_seen": trainer.tokens_seen,
                    "step_seconds": round(step_s, 1),
                    "products": "bf16" if trainer.autocast else "fp32"}  # cfg.autocast on this machine

        trained = self.stage(name, "train", train)
        if trained is None:
            return False
        drafter_dir = trained["drafter"]
        if arch == "dspark":
            self.stage(name, "calibrate", lambda: calibrate_drafter(
                self.target, drafter_dir, [str(self.args.holdout)],
                EvalConfig(temperature=1.0, max_new_tokens=self.args.max_new_tokens, limit=self.args.calibrate_limit),
                plot=False))
        for temperature in TEMPERATURES:
            self.stage(name, f"eval_t{temperature:g}", lambda t=temperature: self.evaluate(name, drafter_dir, t))
        self.stage(name, FINAL_STAGE, lambda: self.latency(drafter_dir))
        return True

    def evaluate(self, name: str, drafter_dir: str, temperature: float) -> dict:
        drafter = load_drafter(drafter_dir, self.target)
        block = drafter.config.block_size
        cfg = EvalConfig(temperature=temperature, block_size=block, max_new_tokens=self.args.max_new_tokens,
                         limit=self.args.limit, batch_size=1)
        eval_dir = self.work / name / f"eval_t{temperature:g}"
        results = run_eval(self.target, {name: drafter}, list(self.args.benchmarks), eval_dir, cfg)
        per = {}
        for bench, entry in results["benchmarks"].items():
            pair = entry["drafters"][name]
            per[bench] = {"accept_length": pair["accept_length"], "speedup_vs_plain": pair["speedup_vs_plain"],
                          "tokens_per_second": pair["tokens_per_second"],
                          "plain_tokens_per_second": entry["drafters"]["none"]["tokens_per_second"]}
            if "calibration" in pair:
                per[bench]["ece_mean"] = pair["calibration"]["ece_mean"]
        sweeps = {dom: v[name]["threshold_sweep"] for dom, v in results["domains"].items() if "threshold_sweep" in v.get(name, {})}
        return {"benchmarks": per, "macro_accept_length": macro(per), "macro_speedup": macro(per, "speedup_vs_plain"),
                **pooled_conditional(eval_dir, name, block), "threshold_sweep": sweeps,
                "eval_dir": str(eval_dir)}

    def latency(self, drafter_dir: str) -> dict:
        drafter = load_drafter(drafter_dir, self.target)
        step = target_step_ms(self.target, self.args.latency_repeats)
        block = drafter.config.block_size
        ms = draft_round_ms(self.target, drafter, self.args.latency_repeats, block=block)
        return {"draft_round_ms": ms, "target_step_ms": step, "draft_round_over_target_step": ms / step}


def claims(runs: dict) -> list[dict]:
    """Each paper claim with what was measured here and whether the goal holds (None: a run is missing)."""

    def tau(name, t):
        return runs.get(name, {}).get(f"eval_t{t:g}", {}).get("macro_accept_length")

    def ratio(a, b, t):
        x, y = tau(a, t), tau(b, t)
        return None if x is None or y is None else x / y

    rows = []
    for t in TEMPERATURES:
        for other, label, goal in (("dflash-b7", "DFlash", 1.10), ("eagle3-b7", "Eagle3", 1.20)):
            r = ratio("dspark-b7", other, t)
            rows.append({"claim": f"Table 1, T = {t:g}: macro tau DSpark / {label}",
                         "measured": None if r is None else f"{r:.3f}x", "goal": f">= {goal:.2f}x",
                         "holds": None if r is None else r >= goal})
    evs = {n: runs.get(n, {}).get("eval_t1", {}) for n in ("dspark-b7", "dflash-b7")}
    if all(ev.get("conditional_acceptance") for ev in evs.values()):
        a, b = (evs[n]["conditional_acceptance"] for n in ("dspark-b7", "dflash-b7"))
        na, nb = (evs[n].get("conditional_rounds", [None] * len(a)) for n in ("dspark-b7", "dflash-b7"))
        cells, above = [], []
        for k in range(2, min(len(a), len(b))):  # positions 3.. (1-based)
            counted = na[k] is not None and nb[k] is not None
            if counted and min(na[k], nb[k]) < MIN_ROUNDS:
                cells.append(f"{a[k]:.2f}/{b[k]:.2f} ({na[k]}/{nb[k]} rounds, too few)")
                continue
            cells.append(f"{a[k]:.2f}/{b[k]:.2f}" + (f" ({na[k]}/{nb[k]} rounds)" if counted else ""))
            if a[k] == a[k] and b[k] == b[k]:  # positions neither run reached are nan
                above.append(a[k] > b[k])
        rows.append({"claim": "Fig. 2: DSpark's conditional acceptance above DFlash's at every position >= 3 "
                              f"reached by >= {MIN_ROUNDS} rounds (T = 1)",
                     "measured": ", ".join(cells) + ("" if None not in na + nb else " (rounds per position not recorded)"),
                     "goal": "above at each", "holds": all(above) if above else None})
    gaps = {b: ratio(f"dspark-b{b}", f"dflash-b{b}", 1.0) for b in (4, 7, 12)}
    rows.append({"claim": "Fig. 4: the DSpark/DFlash tau gap widens with block size (T = 1)",
                 "measured": ", ".join(f"block {b}: {g:.3f}x" for b, g in gaps.items() if g is not None) or None,
                 "goal": "gap at 12 > gap at 4",
                 "holds": None if gaps[4] is None or gaps[12] is None else gaps[12] > gaps[4]})
    for t in TEMPERATURES:
        r = ratio("dspark-1l", "dflash-b7", t)
        rows.append({"claim": f"Fig. 3, T = {t:g}: 1-layer DSpark vs 2-layer DFlash (macro tau)",
                     "measured": None if r is None else f"{r:.3f}x", "goal": ">= 1.00x",
                     "holds": None if r is None else r >= 1.0})
    r = ratio("dspark-rnn-b7", "dspark-b7", 1.0)
    rows.append({"claim": "RNN head vs Markov head (macro tau, T = 1)", "measured": None if r is None else f"{r:.3f}x",
                 "goal": "reported", "holds": None})
    eces = [v["ece_mean"] for v in runs.get("dspark-b7", {}).get("eval_t1", {}).get("benchmarks", {}).values() if "ece_mean" in v]
    if eces:
        e = statistics.fmean(eces)
        rows.append({"claim": "Fig. 6: mean ECE after STS on the evaluation split (DSpark block 7, T = 1)",
                     "measured": f"{100 * e:.1f}%", "goal": "<= 2%", "holds": e <= 0.02})
    return rows


def write_report(state: dict, out: Path, command: str) -> None:
    runs = state["runs"]
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(runs, out)
    rows = claims(runs)
    started_by: dict[str, list[str]] = {}  # command -> the runs it started
    for name, r in runs.items():
        started_by.setdefault(r.get("command", command), []).append(name)
    lines = ["# DSpark vs DFlash vs Eagle3 at equal budget", "", "Made by (each run: the command that started it; "
             "a rerun of the same command resumes it):", "", "```bash"]
    lines += [f"{cmd}    # {', '.join(names)}" for cmd, names in started_by.items()] or [command]
    lines += ["```", "",
             f"Settings: {json.dumps(state['settings'])}", "", "## Claims", "",
             "| claim | measured | goal | holds |", "|---|---|---|---|"]
    for row in rows:
        holds = {True: "yes", False: "**no**", None: "-"}[row["holds"]]
        lines.append(f"| {row['claim']} | {row['measured'] or 'not run yet'} | {row['goal']} | {holds} |")
    benches = sorted({b for r in runs.values() for b in r.get("eval_t1", {}).get("benchmarks", {})})
    for t in TEMPERATURES:
        lines += ["", f"## Accept length and speedup over plain decoding, T = {t:g}", "",
                  "| run | " + " | ".join(benches) + " | macro tau | macro speedup |",
                  "|---|" + "---|" * (len(benches) + 2)]
        for name, r in runs.items():
            ev = r.get(f"eval_t{t:g}")
            if not ev:
                continue
            cells = [f"{ev['benchmarks'][b]['accept_length']:.2f} ({ev['benchmarks'][b]['speedup_vs_plain']:.2f}x)"
                     if b in ev["benchmarks"] else "-" for b in benches]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ev['macro_accept_length']:.2f} | {ev['macro_speedup']:.2f}x |")
    lines += ["", "## Conditional acceptance per draft position (T = 1, all benchmarks pooled)", "",
              "In parentheses: the rounds that reached the position (every earlier draft accepted), where recorded.", "",
              "| run | per position |", "|---|---|"]
    for name, r in runs.items():
        if "eval_t1" in r:
            cond = r["eval_t1"]["conditional_acceptance"]
            counts = r["eval_t1"].get("conditional_rounds")
            cells = [f"{x:.2f}" + (f" ({counts[k]})" if counts else "") for k, x in enumerate(cond)]
            lines.append(f"| {name} | " + " ".join(cells) + " |")
    lines += ["", "## Draft cost, calibration and wall time", "",
              "Plain tok/s: the target decoding alone in each evaluation (T = 0 / T = 1, mean over benchmarks), the "
              "baseline of that row's speedups. Where it differs between rows, the machine ran at a different speed and "
              "the rows' speedups are not strictly comparable; accept lengths do not depend on it.", "",
              "| run | draft round (ms) | / target step | ECE before -> after STS (held-out) | train steps | tokens seen | "
              "train | calibrate | eval T=0 | eval T=1 | plain tok/s | machine |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lat, cal, tr = r.get("latency", {}), r.get("calibrate"), r.get("train", {})
        ece = f"{100 * cal['ece_mean_before']:.1f}% -> {100 * cal['ece_mean_after']:.1f}%" if cal else "-"
        seconds = {s: r[s].get("step_seconds", r[s]["seconds"]) for s in ("train", "calibrate", "eval_t0", "eval_t1") if s in r}
        wall = [f"{seconds[s] / 60:.1f} min" if s in seconds else "-" for s in ("train", "calibrate", "eval_t0", "eval_t1")]
        mach = tr.get("machine", {})
        products = f", {tr['products']} training products" if "products" in tr else ""
        plain = [statistics.mean(b["plain_tokens_per_second"] for b in r[s]["benchmarks"].values())
                 for s in ("eval_t0", "eval_t1") if s in r]
        speed = " / ".join(f"{x:.1f}" for x in plain) or "-"
        lines.append(f"| {name} | {lat.get('draft_round_ms', float('nan')):.2f} | {lat.get('draft_round_over_target_step', float('nan')):.2f} "
                     f"| {ece} | {tr.get('steps', '-')} | {tr.get('tokens_seen', '-')} | " + " | ".join([*wall, speed])
                     + f" | {mach.get('device', '-')}{products}, torch {mach.get('torch', '-')}, dspark {mach.get('dspark', '-')} |")
    if files:
        lines += ["", "## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in files]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    public = {"settings": state["settings"], "command": command, "claims": rows, "runs": runs}
    (out / "results.json").write_text(json.dumps(public, indent=2))


def write_plots(runs: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"plots skipped ({err}); results.json and report.md are written", flush=True)
        return []
    files = []
    done = {n: r for n, r in runs.items() if "eval_t1" in r and "eval_t0" in r}
    if done:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(done)
        for i, t in enumerate(TEMPERATURES):
            ax.bar([j + 0.4 * i for j in range(len(names))], [done[n][f"eval_t{t:g}"]["macro_accept_length"] for n in names],
                   width=0.4, label=f"T = {t:g}")
        ax.set_xticks([j + 0.2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("macro accept length (tau)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "tau_macro.png", dpi=120)
        plt.close(fig)
        files.append("tau_macro.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, r in done.items():
            if n.endswith("-b7") or n == "dspark-1l":
                cond = r["eval_t1"]["conditional_acceptance"]
                counts = r["eval_t1"].get("conditional_rounds") or [MIN_ROUNDS] * len(cond)
                shown = [(k + 1, x) for k, x in enumerate(cond) if counts[k] >= MIN_ROUNDS]  # not a handful of rounds
                ax.plot([k for k, _ in shown], [x for _, x in shown], marker="o", label=n)
        ax.set_xlabel("draft position")
        ax.set_ylabel("conditional acceptance (T = 1)")
        ax.set_title(f"positions reached by >= {MIN_ROUNDS} rounds, where recorded", fontsize=9)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "conditional_acceptance.png", dpi=120)
        plt.close(fig)
        files.append("conditional_acceptance.png")
    for name, r in runs.items():  # the T = 1 evaluation's own threshold-sweep plots
        eval_dir = Path(r["eval_t1"]["eval_dir"]) if "eval_t1" in r else None
        if eval_dir is not None and eval_dir.is_dir():
            for png in sorted(eval_dir.glob("threshold_sweep_*.png")):
                shutil.copyfile(png, out / f"{name}_{png.name}")
        # copied now, or by the run that evaluated it (its eval folder may be gone since)
        files += [png.name for png in sorted(out.glob(f"{name}_threshold_sweep_*.png"))]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--base-preset", default="dspark-smollm2-135m", help="every run's training settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base-preset setting")
    parser.add_argument("--data", required=True, help="feature cache (dspark data cache) or answers folder, shared by every run")
    parser.add_argument("--holdout", required=True, help="held-out training-split prompts (calibration)")
    parser.add_argument("--benchmarks", nargs="+", required=True, help="evaluation prompt files or folders")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps per run (the equal budget)")
    parser.add_argument("--limit", type=int, default=10, help="prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--calibrate-limit", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None, help=f"runs to do (default all): {', '.join(RUNS)}")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop training after this long (checkpoint saved); rerun to continue")
    parser.add_argument("--work", default="runs/reproduce", help="checkpoints and raw evaluation results")
    parser.add_argument("--out", default="docs/results/reproduce")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error(f"--steps must be a positive number of optimizer steps, got {args.steps}")
    unknown = [n for n in args.only or [] if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from: {', '.join(RUNS)}")
    if not benchmark_files(args.benchmarks):
        parser.error(f"no benchmark files in {' '.join(args.benchmarks)}")
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    command = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    repro = Reproduction(args, command)
    here = machine(repro.target.model.device)["device"]
    for name, there in measured_elsewhere({n: r for n, r in repro.state["runs"].items() if n not in (args.only or RUNS)},
                                          here).items():
        print(f"note: {name} was evaluated on {there}, this machine is {here}: accept lengths compare, "
              "speedups and wall times do not", flush=True)
    for name in args.only or list(RUNS):
        complete = repro.run(name, deadline)
        write_report(repro.state, Path(args.out), command)  # after every run: a partial report is kept
        if not complete:
            print(f"[{name}] training stopped by the time budget; rerun the same command to continue", flush=True)
            break
    print(f"report: {Path(args.out) / 'report.md'}" + ("" if complete else " (partial)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
