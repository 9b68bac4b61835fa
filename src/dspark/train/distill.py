"""`dspark distill`: the whole drafter recipe for a target as one resumable command.

Stages, each resumable after a kill and skipped once done (OUT/distill.json records them):
  1. split      hold out every Nth training prompt (by a hash of its id: the same prompts on every
                machine) for calibration and checkpoint checks; never the evaluation prompts
  2. regenerate the target answers the other prompts (local engine, or --endpoint of a vLLM/SGLang
                server); answers.jsonl is append-only and keyed by prompt id
  3. features   the target's features written once (feature cache), or `online` (skipped)
  4. train      the preset, resumed from its newest checkpoint; --max-steps / --time-budget bound
                it (a run stopped by its budget is not done: rerun to continue)
  5. calibrate  sequential temperature scaling on the held-out prompts (drafters with a confidence head)
  6. evaluate   the drafter against plain decoding and n-gram on the evaluation prompts, then
                OUT/report.md
Nothing is regenerated or retrained twice: every stage resumes from what it wrote.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dspark.data.prompts import PromptRecord, read_prompts
from dspark.errors import DSparkError

STAGES = ("split", "regenerate", "features", "train", "calibrate", "evaluate")
STATE_FILE = "distill.json"


@dataclass(frozen=True)
class DistillConfig:
    preset: str = "dspark-smollm2-135m"
    overrides: tuple[str, ...] = ()  # --set key=value for the training preset
    features: str = "cache"  # cache | online
    cache_dtype: str = "bf16"
    holdout_every: int = 40  # hold out prompts with crc32(id) % holdout_every == 0
    max_new_tokens: int = 320
    max_prompt_tokens: int = 1024
    batch_size: int = 16
    endpoint: str | None = None  # an OpenAI-compatible server instead of the local engine
    model: str = "default"
    eval_benchmarks: tuple[str, ...] = ()
    eval_limit: int = 8
    eval_max_new_tokens: int = 128
    eval_temperature: float = 0.0
    calibrate_limit: int = 32
    max_steps: int = 0  # 0: the preset's
    time_budget_s: float | None = field(default=None, compare=False)  # the train stage's; may change between reruns

    def __post_init__(self) -> None:
        if self.features not in ("cache", "online"):
            raise DSparkError(f"features {self.features!r} is not one of: cache, online")
        if self.holdout_every < 2:
            raise DSparkError(f"holdout_every must be >= 2, got {self.holdout_every}")

    def identity(self) -> dict:
        """What a rerun must share with the run it resumes (the time budget and step bound may grow)."""
        raw = asdict(self)
        for key in ("time_budget_s", "max_steps"):
            raw.pop(key)
        return json.loads(json.dumps(raw))


def is_held_out(prompt_id: str, every: int) -> bool:
    """The hold-out rule: crc32(id) % every == 0 (the same prompts on every machine and rerun)."""
    return zlib.crc32(prompt_id.encode()) % every == 0


def split_prompts(prompts: list[PromptRecord], every: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(training prompts, held-out prompts)."""
    train, held = [], []
    for p in prompts:
        (held if is_held_out(p.id, every) else train).append(p)
    return train, held


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def distill(target, prompt_files: list[str], out_dir, cfg: DistillConfig, progress: bool = True,
            log=print) -> dict:
    """Run (or resume) the recipe into out_dir; returns the state (stages done, figures)."""
    from dspark.train.trainer import apply_overrides, get_preset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and state.get("config") != cfg.identity():
        raise DSparkError(f"{out} holds a distill run with other settings; use a new --out (nothing was changed)")
    if state and state.get("target_fingerprint") != target.fingerprint:
        raise DSparkError(f"{out} was distilled for another target (fingerprint {state.get('target_fingerprint')})")
    state = state or {"config": cfg.identity(), "target_fingerprint": target.fingerprint, "done": {}}
    train_cfg = apply_overrides(get_preset(cfg.preset), list(cfg.overrides))
    if cfg.max_steps:
        train_cfg = replace(train_cfg, max_steps=cfg.max_steps)
    prompts = read_prompts(prompt_files)
    if not prompts:
        raise DSparkError(f"no prompts in {', '.join(map(str, prompt_files))}")
    start = time.monotonic()

    def stage(name: str, run) -> None:
        number = STAGES.index(name) + 1
        if name in state["done"]:
            log(f"[{number}/{len(STAGES)}] {name}: done before, skipped")
            return
        log(f"[{number}/{len(STAGES)}] {name} (elapsed {time.monotonic() - start:.0f} s)")
        t0 = time.monotonic()
        result = run()
        if result is None:  # not finished (e.g. a time budget): stays open for the rerun
            return
        state["done"][name] = {**result, "seconds": round(time.monotonic() - t0, 1)}
        _write_json(state_path, state)

    train_prompts, held = split_prompts(prompts, cfg.holdout_every)
    holdout_file = out / "holdout_prompts.jsonl"

    def do_split():
        lines = [json.dumps({"id": p.id, "turns": [p.first_user_turn]}) for p in held]
        tmp = holdout_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
        os.replace(tmp, holdout_file)
        return {"train_prompts": len(train_prompts), "held_out_prompts": len(held)}

    def do_regenerate():
        from dspark.data.regenerate import RegenerateConfig, regenerate_endpoint, regenerate_local

        rcfg = RegenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                max_prompt_tokens=cfg.max_prompt_tokens)
        if cfg.endpoint:
            stats = regenerate_endpoint(cfg.endpoint, cfg.model, train_prompts, out / "data", rcfg, progress=progress)
        else:
            stats = regenerate_local(target, train_prompts, out / "data", rcfg, progress=progress)
        return {"answers_written": stats["written"], "tokens": stats["tokens"]}

    def do_features():
        if cfg.features == "online":
            return {"features": "online"}
        from dspark.data.feature_cache import write_cache
        from dspark.train.trainer import drafter_config, load_sequences

        sequences = load_sequences(out / "data", target.tokenizer, train_cfg.max_length)
        layers = drafter_config(target, train_cfg).target_layer_ids
        manifest = write_cache(target, sequences, layers, out / "cache", cfg.cache_dtype, progress=progress)
        return {"features": "cache", "sequences": manifest["num_sequences"],
                "tokens": sum(s["tokens"] for s in manifest["shards"])}

    def do_train():
        from dspark.train.trainer import Trainer

        data = out / ("cache" if cfg.features == "cache" else "data")
        trainer = Trainer(target, train_cfg, data, out / "run")
        final = trainer.run(progress=progress, time_budget_s=cfg.time_budget_s)
        if trainer.step < trainer.total_steps:
            log(f"training stopped at step {trainer.step} of {trainer.total_steps} (time budget); rerun to continue")
            return None
        return {"drafter": str(final), "steps": trainer.step, "tokens_seen": trainer.tokens_seen}

    def do_calibrate():
        from dspark.eval.runner import EvalConfig, calibrate_drafter

        drafter_dir = state["done"]["train"]["drafter"]
        if not held:
            return {"skipped": "no held-out prompts"}
        if train_cfg.arch != "dspark" or not train_cfg.drafter.get("confidence_head", True):
            return {"skipped": "the drafter has no confidence head"}
        cal = calibrate_drafter(target, drafter_dir, [str(holdout_file)],
                                EvalConfig(temperature=1.0, max_new_tokens=cfg.eval_max_new_tokens,
                                           limit=cfg.calibrate_limit), plot=False)
        return {"ece_mean_before": cal["ece_mean_before"], "ece_mean_after": cal["ece_mean_after"]}

    def do_evaluate():
        from dspark.drafters.checkpoint import load_drafter
        from dspark.drafters.simple import NgramDrafter
        from dspark.eval.runner import EvalConfig, run_eval

        if not cfg.eval_benchmarks:
            return {"skipped": "no --eval-benchmarks"}
        drafter_dir = state["done"]["train"]["drafter"]
        drafter = load_drafter(drafter_dir, target)
        ecfg = EvalConfig(temperature=cfg.eval_temperature, block_size=drafter.config.block_size,
                          max_new_tokens=cfg.eval_max_new_tokens, limit=cfg.eval_limit)
        results = run_eval(target, {"ngram": NgramDrafter(), drafter_dir: drafter}, list(cfg.eval_benchmarks),
                           out / "eval", ecfg, plots=False)
        summary = {}
        for bench, entry in results["benchmarks"].items():
            summary[bench] = {label: {"accept_length": round(pair["accept_length"], 3),
                                      "speedup_vs_plain": round(pair["speedup_vs_plain"], 3)}
                              for label, pair in entry["drafters"].items()}
        return {"benchmarks": summary}

    for name, run in (("split", do_split), ("regenerate", do_regenerate), ("features", do_features),
                      ("train", do_train), ("calibrate", do_calibrate), ("evaluate", do_evaluate)):
        stage(name, run)
        if name not in state["done"]:
            break  # a stage that did not finish leaves the later ones for the rerun
    (out / "report.md").write_text(report(state))
    return state


def report(state: dict) -> str:
    """OUT/report.md: what each stage did and, once evaluated, the drafter against the baselines."""
    done = state["done"]
    lines = ["# dspark distill", "", "| stage | status | seconds | result |", "|---|---|---|---|"]
    for name in STAGES:
        if name in done:
            info = {k: v for k, v in done[name].items() if k not in ("seconds", "benchmarks")}
            lines.append(f"| {name} | done | {done[name]['seconds']} | {json.dumps(info)} |")
        else:
            lines.append(f"| {name} | pending | | |")
    benchmarks = done.get("evaluate", {}).get("benchmarks")
    if benchmarks:
        lines += ["", "| benchmark | drafter | accept length | speedup vs plain |", "|---|---|---|---|"]
        for bench, by_drafter in benchmarks.items():
            for label, figures in by_drafter.items():
                lines.append(f"| {bench} | {label} | {figures['accept_length']:.2f} | {figures['speedup_vs_plain']:.2f}x |")
    return "\n".join(lines) + "\n"
