"""Command line: parse arguments, build configs, call the library. `dspark --help` lists commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dspark.errors import DSparkError

# --dtype of the compute-bound commands (regeneration, feature cache, training); auto: see config.resolve_dtype
DTYPE_CHOICES = ("auto", "bf16", "fp32")
AUTO_DTYPE_HELP = ("dtype of the target; auto (default): bf16 where the CPU has bf16 matmul units, else fp32 "
                   "(several times faster for this compute-bound job, twice the memory)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: JSONL (DeepSpec `turns` -> first turn, or `prompt`), else one per line."""
    file = Path(path)
    if not file.is_file():
        raise DSparkError(f"prompts file {path!r} does not exist")
    lines = [line for line in file.read_text().split("\n") if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DSparkError(f"{path}:{number} is not valid JSON ({err.msg})") from None
        if isinstance(row, dict) and row.get("turns"):
            prompts.append(row["turns"][0])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        else:
            raise DSparkError(f"{path}:{number} has neither 'turns' (a list) nor 'prompt' (a string)")
    return prompts


def add_generate_parser(sub) -> None:
    from dspark.drafters.registry import DRAFTERS
    from dspark.models.loading import BUILTIN_MODELS

    p = sub.add_parser("generate", help="generate text with speculative decoding")
    p.add_argument("--target", default="smollm2-135m",
                   help=f"builtin name ({', '.join(BUILTIN_MODELS)}), a .gguf file, or a HF model folder")
    p.add_argument("--drafter", default="auto",
                   help=f"one of: {', '.join(DRAFTERS)} (auto: the target's builtin DSpark drafter behind prompt lookup, else ngram)")
    p.add_argument("--draft-model", help="model spec for --drafter draft-model (same forms as --target)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL with 'turns' or 'prompt'")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--system", help="system prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i. Sampled text repeats "
                   "exactly under none, fixed or threshold; auto, scheduled and async pick verification lengths from "
                   "timings, so it varies from run to run (its distribution does not)")
    p.add_argument("--block-size", type=_non_negative_int, default=8, help="draft tokens verified per round (K)")
    p.add_argument("--policy", default="auto",
                   help="verification policy: auto (default: scheduled on this machine's cost table, profiled once "
                        "and cached, so drafting happens only where it pays; none without a drafter), none, "
                        "fixed[:K] (verify all K), threshold[:C], scheduled, async")
    p.add_argument("--cost", help="cost table JSON for auto/scheduled/async (dspark profile; default: auto reads "
                                  "this machine's cached table or profiles and caches it now, scheduled/async "
                                  "profile now)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="requests decoded together")
    p.add_argument("--max-seq-len", type=_positive_int, default=None,
                   help="context length (default: longest prompt + max new tokens, within the model's limit)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from dspark.config import EngineConfig, SamplingParams, StopParams
    from dspark.drafters.registry import build_drafter, resolve_drafter_name
    from dspark.engine.engine import Engine, Request
    from dspark.models.target import load_model
    from dspark.engine.policy_spec import resolve_policy
    from dspark.text import StopStrings, decode_output, encode_prompt

    prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
    if not prompts:
        raise DSparkError(f"prompts file {args.prompts_file!r} has no prompts")
    sampling = [SamplingParams(args.temperature, args.top_k, args.top_p, args.seed + i) for i in range(len(prompts))]
    stop = StopParams(max_new_tokens=args.max_new_tokens)
    target = load_model(args.target, args.dtype)
    drafter = build_drafter(args.drafter, target, args.draft_model, args.dtype)
    drafter_label = _drafter_label(resolve_drafter_name(args.drafter, target))
    tok = target.tokenizer
    encoded = [encode_prompt(tok, p, args.chat, args.system) for p in prompts]
    limit = target.max_position_embeddings
    max_seq_len = args.max_seq_len or min(limit, max(map(len, encoded)) + args.max_new_tokens)
    for i, ids in enumerate(encoded):
        if len(ids) + 1 > max_seq_len:
            raise DSparkError(
                f"prompt {i} has {len(ids)} tokens, longer than the context length {max_seq_len} allows "
                f"(model limit {limit}); shorten it or raise --max-seq-len"
            )
    config = EngineConfig(block_size=args.block_size, max_batch_size=min(args.batch_size, len(prompts)),
                          max_seq_len=max_seq_len)
    engine = Engine(target, drafter, config)
    policy = resolve_policy(args.policy, target, drafter, config, args.cost)
    checker = StopStrings(tok, args.stop) if args.stop else None
    requests = [Request(ids, sampling[i], stop, request_id=i, stop_checker=checker) for i, ids in enumerate(encoded)]
    start = time.perf_counter()
    outputs = engine.generate(requests, policy)
    wall = time.perf_counter() - start
    for out in outputs:
        text = decode_output(tok, out.token_ids, target.eos_token_ids, args.stop)
        if args.json:
            record = {
                "index": out.request_id, "text": text, "token_ids": out.token_ids,
                "num_generated": out.stats.num_generated, "finish_reason": out.finish_reason,
                "rounds": out.stats.rounds, "accept_length": round(out.stats.accept_length, 4),
                "accepted_per_position": out.stats.accepted_per_position,
                "verified_per_position": out.stats.verified_per_position,
                "tokens_per_second": round(out.stats.tokens_per_second, 3),
            }
            print(json.dumps(record), flush=True)
        else:
            print(text, flush=True)
    if not args.json:
        total = sum(o.stats.num_generated for o in outputs)
        rounds = sum(o.stats.rounds for o in outputs)
        committed = sum(o.stats.committed_in_rounds for o in outputs)
        print(f"\n[{drafter_label}] {total} tokens in {wall:.2f}s ({total / wall:.1f} tok/s), "
              f"accept length {committed / max(rounds, 1):.2f} over {rounds} rounds", file=sys.stderr)
    return 0


def add_drafter_parser(sub) -> None:
    from dspark.drafters.checkpoint import ARCHS, SETTABLE

    p = sub.add_parser("drafter", help="create and inspect drafter folders")
    dsub = p.add_subparsers(dest="drafter_command", required=True)
    init = dsub.add_parser("init", help="write a randomly initialised drafter for a target")
    init.add_argument("--target", default="smollm2-135m")
    init.add_argument("--arch", required=True, choices=ARCHS)
    init.add_argument("--out", required=True, help="new folder (refused if it exists and is not empty)")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help=f"override a setting ({', '.join(SETTABLE)})")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"], help="dtype of the stored weights")
    init.set_defaults(func=run_drafter_init)
    info = dsub.add_parser("info", help="print a drafter's config and parameter counts")
    info.add_argument("path", help="a drafter folder or a builtin drafter's name")
    info.set_defaults(func=run_drafter_info)
    export = dsub.add_parser("export", help="write a drafter folder that vLLM and SGLang load (DeepSpec layout)")
    export.add_argument("path", help="a drafter folder (drafter init / training, or an imported DeepSpec folder)")
    export.add_argument("--format", dest="fmt", default="deepspec", choices=["deepspec", "speculators"],
                        help="deepspec: vLLM and SGLang; speculators: vLLM only")
    export.add_argument("--out", required=True, help="new folder (refused if it exists and is not empty)")
    export.add_argument("--target", required=True,
                        help="the Qwen3 target the drafter was made for (both engines serve DSpark for Qwen3 only)")
    export.add_argument("--profile", help="cost table JSON (dspark profile) -> SGLang's sps.json (hardware-specific)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(func=run_drafter_export)


def run_drafter_init(args) -> int:
    from dspark.drafters.checkpoint import new_dspark_config, parse_overrides, build_dspark_model, save_drafter
    from dspark.models.target import load_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise DSparkError(f"{out} already exists and is not empty; choose another --out (nothing was written)")
    overrides = parse_overrides(args.set)
    target = load_model(args.target, args.dtype)
    if args.arch == "eagle3":
        from dspark.drafters.eagle3 import build_eagle3_model, new_eagle3_config

        model = build_eagle3_model(new_eagle3_config(target, overrides), target, seed=args.seed)
    else:
        model = build_dspark_model(new_dspark_config(target, args.arch, overrides), target, seed=args.seed)
    save_drafter(model, out)
    print(f"wrote {args.arch} drafter for {args.target} to {out}")
    return 0


def _drafter_label(resolved: str) -> str:
    """How a summary line names the drafter: a builtin drafter by its name, others as given."""
    from dspark.drafters.registry import builtin_drafters
    from dspark.drafters.simple import LOOKUP_SUFFIX, behind_lookup

    if (inner := behind_lookup(resolved)) is not None:
        return _drafter_label(inner) + LOOKUP_SUFFIX
    for name, folder in builtin_drafters().items():
        if str(folder) == resolved:
            return f"builtin {name}"
    return resolved


def run_drafter_info(args) -> int:
    from safetensors import safe_open

    from dspark.drafters.checkpoint import read_drafter_config
    from dspark.drafters.registry import builtin_drafters

    builtin = builtin_drafters()
    if args.path in builtin:
        args.path = str(builtin[args.path])
    raw = read_drafter_config(args.path)
    counts: dict[str, int] = {}
    with safe_open(str(Path(args.path) / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            numel = 1
            for dim in handle.get_slice(key).get_shape():
                numel *= dim
            group = key.split(".")[0]
            counts[group] = counts.get(group, 0) + numel
    info = {"arch": raw["arch"], "config": raw["config"], "parameters": counts, "total_parameters": sum(counts.values()),
            "note": "embedding and LM head are the target's (shared, not stored)"}
    for extra in ("card.json", "calibration.json"):  # how a builtin drafter was made; its calibration
        if (Path(args.path) / extra).is_file():
            info[extra.removesuffix(".json")] = json.loads((Path(args.path) / extra).read_text())
    print(json.dumps(info, indent=2))
    return 0


def run_drafter_export(args) -> int:
    from dspark.drafters.export import export_drafter
    from dspark.models.target import load_model

    target = load_model(args.target, "bf16", with_tokenizer=False)
    out = export_drafter(args.path, target, args.fmt, out=args.out, cost_profile=args.profile, overwrite=args.overwrite)
    print(f"wrote a {args.fmt} export of {args.path} to {out}")
    return 0


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="training data: answer regeneration")
    dsub = p.add_subparsers(dest="data_command", required=True)
    regen = dsub.add_parser("regenerate", help="have the target answer prompts (resumable)")
    regen.add_argument("--target", default="smollm2-135m")
    regen.add_argument("--prompts", nargs="+", required=True, help="JSONL files or folders (DeepSpec turns, ShareGPT, messages)")
    regen.add_argument("--out", required=True, help="folder for answers.jsonl (rerun to resume)")
    regen.add_argument("--endpoint", help="OpenAI-compatible server URL instead of the local engine")
    regen.add_argument("--model", default="default", help="model name sent to --endpoint")
    regen.add_argument("--api-key", help="Bearer token for --endpoint")
    regen.add_argument("--limit", type=_positive_int, help="only the first N prompts")
    regen.add_argument("--max-new-tokens", type=_positive_int, default=512)
    regen.add_argument("--temperature", type=float, default=0.7)
    regen.add_argument("--top-p", type=float, default=0.8)
    regen.add_argument("--top-k", type=_non_negative_int, default=20)
    regen.add_argument("--batch-size", type=_positive_int, default=16)
    regen.add_argument("--max-prompt-tokens", type=_non_negative_int, default=0,
                       help="skip prompts longer than this (0: the model's limit); training truncates to its max_length")
    regen.add_argument("--seed", type=int, default=0)
    regen.add_argument("--drafter", default="none", choices=["none", "ngram"],
                       help="local engine: plain decoding (fastest at batch 16 here) or n-gram speculation")
    regen.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    regen.set_defaults(func=run_regenerate)
    cache = dsub.add_parser("cache", help="write the target's features of regenerated answers once (resumable)")
    cache.add_argument("--target", default="smollm2-135m")
    cache.add_argument("--data", required=True, help="folder with answers.jsonl")
    cache.add_argument("--out", required=True, help="cache folder (rerun to resume)")
    cache.add_argument("--layers", help="comma-separated target layer ids (default: the drafters' default)")
    cache.add_argument("--cache-dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                       help="feature dtype; fp8 is the compact form (half the bytes, lossy)")
    cache.add_argument("--max-length", type=_positive_int, default=1536, help="tokens per conversation (the preset's max_length)")
    cache.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    cache.set_defaults(func=run_cache)


def run_regenerate(args) -> int:
    from dspark.data.prompts import read_prompts
    from dspark.data.regenerate import RegenerateConfig, regenerate_endpoint, regenerate_local

    prompts = read_prompts(args.prompts)[: args.limit]
    cfg = RegenerateConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.batch_size, args.seed,
                           args.drafter, args.max_prompt_tokens)
    if args.endpoint:
        stats = regenerate_endpoint(args.endpoint, args.model, prompts, args.out, cfg, args.api_key)
    else:
        from dspark.models.target import load_model

        stats = regenerate_local(load_model(args.target, args.dtype), prompts, args.out, cfg)
    print(json.dumps(stats, indent=2))
    return 0


def run_cache(args) -> int:
    from dspark.data.feature_cache import bytes_per_token, deepspec_bytes_per_token, write_cache
    from dspark.drafters.dspark import default_target_layer_ids
    from dspark.models.target import load_model
    from dspark.train.trainer import load_sequences

    target = load_model(args.target, args.dtype)
    hidden, layers = target.model.args.hidden_size, target.model.args.num_layers
    try:
        ids = tuple(int(x) for x in args.layers.split(",")) if args.layers else default_target_layer_ids(layers)
    except ValueError:
        raise DSparkError(f"--layers expects comma-separated integers, got {args.layers!r}") from None
    if not all(-1 <= i < layers for i in ids):
        raise DSparkError(f"--layers {list(ids)} must lie in [0, {layers - 1}] or be -1 (the embedding output)")
    sequences = load_sequences(args.data, target.tokenizer, args.max_length)
    tokens = sum(s.input_ids.numel() for s in sequences)
    per_token = bytes_per_token(hidden, len(ids), args.cache_dtype)
    print(f"{len(sequences)} sequences, {tokens} tokens: {per_token} bytes/token -> {tokens * per_token / 1e6:.1f} MB "
          f"(DeepSpec's layout: {deepspec_bytes_per_token(hidden)} bytes/token -> "
          f"{tokens * deepspec_bytes_per_token(hidden) / 1e6:.1f} MB; --cache-dtype fp8 halves it)", file=sys.stderr)
    manifest = write_cache(target, sequences, ids, args.out, args.cache_dtype)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"} | {"shards": len(manifest["shards"])}, indent=2))
    return 0


def _duration(text: str) -> float:
    """'90s', '45m', '2h' or plain seconds -> seconds (> 0)."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 900s, 45m, 2h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0, got {text!r}")
    return value


def add_train_parser(sub) -> None:
    from dspark.train.trainer import PRESETS

    p = sub.add_parser("train", help="train a DSpark or DFlash drafter (resumes from --out)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--data", required=True,
                   help="folder with answers.jsonl (features computed online) or a feature cache (dspark data cache)")
    p.add_argument("--out", required=True, help="run folder: step_N/ drafter folders, latest, train_log.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting (e.g. max_steps=100, lr=1e-3) or a drafter setting (drafter.markov_rank=32)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    p.add_argument("--eval-prompts", nargs="*", default=[],
                   help="held-out prompt files: at every checkpoint, measure the real accept length on them")
    p.add_argument("--eval-limit", type=_positive_int, default=8, help="how many held-out prompts")
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files here")
    p.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="stop after this long (e.g. 45m, 2h, 900s), saving a checkpoint; rerun to resume")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from dspark.models.target import load_model
    from dspark.train.trainer import Trainer, apply_overrides, get_preset, init_distributed

    from dspark.data.prompts import read_prompts
    from dspark.text import encode_messages

    cfg = apply_overrides(get_preset(args.preset), args.set)
    target = load_model(args.target, args.dtype)
    eval_ids = [encode_messages(target.tokenizer, list(p.messages))
                for p in read_prompts(args.eval_prompts)[: args.eval_limit]] if args.eval_prompts else None
    distributed = init_distributed()
    try:
        trainer = Trainer(target, cfg, args.data, args.out, eval_ids, args.tensorboard)
        final = trainer.run(time_budget_s=args.time_budget)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"trained {trainer.step} steps on {trainer.world} process(es); drafter folder: {final}")
    return 0


def add_distill_parser(sub) -> None:
    from dspark.train.trainer import PRESETS

    p = sub.add_parser("distill", help="the whole recipe, resumable stage by stage: hold out, regenerate, "
                                       "features, train, calibrate, evaluate, report")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--prompts", nargs="+", required=True, help="training prompt files or folders (never the eval split)")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--preset", default="dspark-smollm2-135m", help=f"training preset, one of: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training or drafter setting")
    p.add_argument("--features", default="cache", choices=["cache", "online"],
                   help="write the target's features once (cache) or compute them in every step (online)")
    p.add_argument("--cache-dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"])
    p.add_argument("--endpoint", help="regenerate through this OpenAI-compatible server (vLLM, SGLang) instead of locally")
    p.add_argument("--model", default="default", help="model name sent to --endpoint")
    p.add_argument("--max-new-tokens", type=_positive_int, default=320, help="answer length when regenerating")
    p.add_argument("--max-prompt-tokens", type=_non_negative_int, default=1024, help="skip longer prompts (0: no limit)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="regeneration batch")
    p.add_argument("--holdout-every", type=_positive_int, default=40,
                   help="hold out 1 prompt in N (by id hash) for calibration")
    p.add_argument("--max-steps", type=_non_negative_int, default=0, help="training steps (0: the preset's epochs)")
    p.add_argument("--time-budget", type=_duration, metavar="DURATION",
                   help="training stops after this long (e.g. 45m) with a checkpoint; rerun to continue")
    p.add_argument("--eval-benchmarks", nargs="*", default=[], help="evaluation prompt files or folders")
    p.add_argument("--eval-limit", type=_positive_int, default=8, help="prompts per benchmark")
    p.add_argument("--eval-max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--eval-temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=AUTO_DTYPE_HELP)
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    from dspark.models.target import load_model
    from dspark.train.distill import DistillConfig, distill

    cfg = DistillConfig(preset=args.preset, overrides=tuple(args.set), features=args.features,
                        cache_dtype=args.cache_dtype, holdout_every=args.holdout_every,
                        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        batch_size=args.batch_size, endpoint=args.endpoint, model=args.model,
                        eval_benchmarks=tuple(args.eval_benchmarks), eval_limit=args.eval_limit,
                        eval_max_new_tokens=args.eval_max_new_tokens, eval_temperature=args.eval_temperature,
                        max_steps=args.max_steps, time_budget_s=args.time_budget)
    target = load_model(args.target, args.dtype)
    distill(target, args.prompts, args.out, cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(Path(args.out, "report.md").read_text())
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="accept length and speedup per benchmark, against plain decoding")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", action="append", required=True, help="a drafter (repeatable): ngram, draft-model, a folder")
    p.add_argument("--draft-model", help="model spec for --drafter draft-model")
    p.add_argument("--benchmarks", nargs="+", required=True, help="DeepSpec-format JSONL files or folders")
    p.add_argument("--out", required=True, help="results folder (rerun to resume)")
    p.add_argument("--limit", type=_positive_int, help="first N prompts of each benchmark")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block-size", type=_positive_int, default=7)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--batch-size", type=_positive_int, default=1, help="requests decoded together (speedups hold at this batch)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (JSON and Markdown only)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--policy", default="fixed",
                   help="verification policy, as for generate (default fixed: every draft is verified, the "
                        "drafter's own tau; auto: what `dspark generate` and `dspark serve` do on this machine)")
    p.set_defaults(func=run_eval_command)


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit per-position confidence temperatures (STS) into a drafter folder")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", required=True, help="a drafter folder with a confidence head")
    p.add_argument("--prompts", nargs="+", required=True,
                   help="held-out prompt files or folders (disjoint from the evaluation set)")
    p.add_argument("--limit", type=_positive_int, help="first N prompts of each file")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the calibration runs")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.set_defaults(func=run_calibrate_command)


def run_calibrate_command(args) -> int:
    import warnings

    from dspark.eval.runner import EvalConfig, calibrate_drafter
    from dspark.models.target import load_model

    for spec in args.prompts:
        if not Path(spec).exists():
            raise DSparkError(f"prompts {spec!r} do not exist")
        if "eval" in Path(spec).resolve().parts:
            warnings.warn(f"{spec} looks like an evaluation set; calibrate on prompts disjoint from what you evaluate on")
    if not Path(args.drafter, "config.json").is_file():
        raise DSparkError(f"--drafter {args.drafter!r} is not a drafter folder (no config.json)")
    target = load_model(args.target, args.dtype)
    cfg = EvalConfig(args.temperature, 7, args.max_new_tokens, args.limit, args.batch_size)
    cal = calibrate_drafter(target, args.drafter, args.prompts, cfg)
    print(json.dumps({k: cal[k] for k in ("temperatures", "ece_mean_before", "ece_mean_after", "num_rounds")}, indent=2))
    print(f"wrote {Path(args.drafter) / 'calibration.json'} (applied whenever this drafter is loaded)")
    return 0


def run_eval_command(args) -> int:
    from dspark.drafters.registry import build_drafter
    from dspark.engine.policy_spec import check_policy_spec
    from dspark.eval.runner import EvalConfig, run_eval
    from dspark.models.target import load_model

    for spec in args.benchmarks:
        if not Path(spec).exists():
            raise DSparkError(f"benchmark {spec!r} does not exist")
    check_policy_spec(args.policy, args.block_size)
    target = load_model(args.target, args.dtype)
    drafters = {name: build_drafter(name, target, args.draft_model, args.dtype) for name in args.drafter}
    cfg = EvalConfig(args.temperature, args.block_size, args.max_new_tokens, args.limit, args.batch_size,
                     policy=args.policy)
    run_eval(target, drafters, args.benchmarks, args.out, cfg, plots=not args.no_plots)
    print((Path(args.out) / "report.md").read_text())
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value}")
    return value


SERVE_STARTUP = """start-up: the server answers once the target and drafter are loaded (seconds; a GGUF target's
first run also converts it once). --policy auto, scheduled or async without --cost does not wait
for its cost table: requests are served with none (auto: plain decoding) or fixed (scheduled,
async: verify every draft) while the table is profiled between decode steps in the background
(tens of seconds to minutes, growing with --max-batch-size and --block-size; decoding pauses for
one measurement at a time), then the policy switches; /health says "profile": "profiling" or
"ready". The table is cached under $DSPARK_CACHE_DIR/profiles (else
$XDG_CACHE_HOME/dspark/profiles or ~/.cache/dspark/profiles), keyed by machine, target weights, dtype
and engine shape, so a restart with the same settings is ready at once."""


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (serve extra)",
                       description="OpenAI-compatible HTTP server with continuous batching (serve extra).",
                       epilog=SERVE_STARTUP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", default="auto",
                   help="auto (the target's builtin DSpark drafter behind prompt lookup, else ngram), builtin, ngram, none, draft-model, a drafter folder, or a model drafter + ngram")
    p.add_argument("--draft-model", help="model spec for --drafter draft-model")
    p.add_argument("--policy", default="auto",
                   help="auto (default: scheduled on this machine's cost table, plain decoding until it is ready; "
                        "none without a drafter), none, fixed[:K], threshold[:C], scheduled, async")
    p.add_argument("--cost", help="cost table JSON for auto/scheduled/async (dspark profile; default: profiled "
                                  "in the background after start-up, cached per machine; see below)")
    p.add_argument("--threshold", type=float, help="confidence cut for --policy threshold")
    p.add_argument("--block-size", type=_non_negative_int, help="draft tokens verified per round at most (K)")
    p.add_argument("--max-batch-size", type=_positive_int, help="requests decoding at once (engine slots)")
    p.add_argument("--max-seq-len", type=_positive_int, help="context per request (default: min(2048, model's))")
    p.add_argument("--max-queue", type=_non_negative_int, default=64, help="waiting requests before 503")
    p.add_argument("--max-body-bytes", type=_positive_int,
                   help="larger request bodies get a 413 before parsing (default: 64 bytes per token of context, "
                        "at least 1 MiB)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=5.0,
                   help="on SIGTERM, seconds requests in flight may still finish; then streams end with an error "
                        "event and [DONE], other requests get a 503 (default: %(default)g)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", help="name served in /v1/models (default: the target's)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from dspark.serve.server import serve

    serve(args.target, args.drafter, args.policy, host=args.host, port=args.port, api_key=args.api_key,
          max_batch_size=args.max_batch_size, block_size=args.block_size, max_seq_len=args.max_seq_len,
          draft_model=args.draft_model, dtype=args.dtype, max_queue=args.max_queue,
          model_name=args.model_name, cost=args.cost, threshold=args.threshold,
          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout)
    return 0


def add_loadtest_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="tok/s of a running server at several concurrency levels")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    p.add_argument("--prompts", help="prompts file (as generate --prompts-file); default: built-in prompts")
    p.add_argument("--max-tokens", type=_positive_int, default=128)
    p.add_argument("--requests-per-level", type=_positive_int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (no time to first token)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (equal work per run)")
    p.add_argument("--api-key")
    p.add_argument("--out", required=True, help="report folder; runs with other labels there are plotted too")
    p.add_argument("--label", required=True, help="this run's name, e.g. the server's policy")
    p.set_defaults(func=run_loadtest_command)


def run_loadtest_command(args) -> int:
    from dspark.serve.loadtest import DEFAULT_PROMPTS, load_loadtest_results, run_loadtest, write_loadtest_report
    from dspark.serve.server import require_serve_extra

    require_serve_extra()
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise DSparkError(f"--concurrency expects comma-separated integers, got {args.concurrency!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise DSparkError(f"--concurrency needs levels >= 1, got {args.concurrency!r}")
    prompts = read_prompts_file(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    result = run_loadtest(args.url, levels, prompts, args.max_tokens, args.requests_per_level, args.api_key,
                          stream=not args.no_stream, chat=args.chat, temperature=args.temperature,
                          ignore_eos=args.ignore_eos)
    paths = write_loadtest_report(result, args.out, args.label)
    runs = load_loadtest_results(args.out)
    if len(runs) > 1:
        write_loadtest_report(runs, args.out, "comparison")
    print(paths["markdown"].read_text())
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure the target's verification cost table SPS(B) on this machine")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", help="also time one propose of this drafter for each --requests count (stored in the "
                                     "table's meta; dspark simulate then charges it)")
    p.add_argument("--draft-model", help="model spec for --drafter draft-model")
    p.add_argument("--tokens", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64], help="verify batch sizes B (tokens)")
    p.add_argument("--requests", type=_int_list, default=[1, 2, 4, 8, 16],
                   help="request counts R that get their own curve, R rows of 1..K+1 tokens (the engine's shape)")
    p.add_argument("--context", type=_non_negative_int, default=256, help="cached tokens per request")
    p.add_argument("--block-size", type=_non_negative_int, default=8, help="rows hold at most K+1 tokens")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", required=True, help="cost table JSON (dspark serve --cost, dspark simulate --profile)")
    p.set_defaults(func=run_profile)


def run_profile(args) -> int:
    from dspark.drafters.registry import build_drafter
    from dspark.engine.profile import profile_target
    from dspark.models.target import load_model

    target = load_model(args.target, args.dtype)
    drafter = build_drafter(args.drafter, target, args.draft_model, args.dtype) if args.drafter else None
    cost = profile_target(target, batch_tokens=args.tokens, context=args.context, repeats=args.repeats,
                          block_size=args.block_size, drafter=drafter, rows=args.requests, drafter_requests=args.requests)
    cost.save(args.out)
    for b, sps in zip(cost.tokens, cost.sps):
        print(f"B={b:5d}  {sps:9.2f} steps/s  {1000 / sps:8.2f} ms/step")
    for r, curve in cost.by_rows:
        print(f"R={r:3d}  " + "  ".join(f"B={b}: {1000 / s:.1f} ms" for b, s in zip(curve.tokens, curve.sps)))
    for r, seconds in cost.padding:
        print(f"R={r:3d}  a padded token adds {1000 * seconds:.3f} ms")
    for r, (a, b) in cost.context_s:
        print(f"R={r:3d}  per cached token beyond {cost.context}: +{1e6 * a:.2f} us, +{1e6 * b:.2f} us per extra column")
    return 0


def add_simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a round trace under a cost table: tokens/s per policy and load")
    p.add_argument("--profile", required=True, help="cost table JSON (dspark profile, or SGLang's sps.json)")
    p.add_argument("--trace", required=True,
                   help="JSONL of {confidences, accepted} per request-round (optional: proposed, request, context)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--policies", default="none,fixed,scheduled,async", help="none, fixed[:K], threshold[:C], scheduled, async")
    p.add_argument("--steps", type=_positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-draft-cost", action="store_true",
                   help="leave out the drafter's time even if the table has it (dspark profile --drafter)")
    p.add_argument("--draft-ms", type=_non_negative_float, default=None,
                   help="charge this many ms per drafting round at every request count instead of the table's "
                        "drafter timing (what would a slower or faster drafter buy; 0 = free drafting)")
    p.add_argument("--replay", choices=("positions", "rounds"), default="positions",
                   help="positions: a round that commits less than its record did replays the rest of that record "
                        "next (same work per request for every policy); rounds: one record per round")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_simulate)


def run_simulate(args) -> int:
    from dspark.engine.cost import CostTable
    from dspark.engine.simulate import plot_simulation, results_to_json, simulate

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    cost = CostTable.load(args.profile)
    if args.draft_ms is not None:
        cost = cost.with_draft_time(args.draft_ms / 1000)
    results = simulate(args.trace, cost, policies, args.concurrency, steps=args.steps, seed=args.seed,
                       draft_cost=not args.no_draft_cost, replay=args.replay)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(results_to_json(results), indent=1) + "\n")
    plot_simulation(results, out / "simulation.png")
    print(f"{'policy':<14}{'R':>6}{'tok/s':>11}{'per user':>10}{'verif.':>8}{'tau':>7}{'speedup':>9}")
    for r in results:
        print(f"{r.policy:<14}{r.concurrency:>6}{r.tokens_per_s:>11.1f}{r.per_user_tokens_per_s:>10.2f}"
              f"{r.mean_verified:>8.2f}{r.accept_length:>7.2f}{r.speedup:>8.2f}x")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dspark")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="Lossless speculative decoding with DSpark drafters")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_drafter_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_distill_parser(sub)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    add_serve_parser(sub)
    add_loadtest_parser(sub)
    add_profile_parser(sub)
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DSparkError as err:
        print(f"dspark: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
