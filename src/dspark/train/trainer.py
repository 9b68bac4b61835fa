"""The DSpark/DFlash trainer: frozen target (online features), shared frozen embedding and LM head,
AdamW with warmup + cosine, gradient clipping and accumulation, checkpoints in the drafter folder
format plus optimizer / RNG / data position for exact resume, JSONL logs and a progress bar with the
loss and a running tau estimate.

Normalisation (DeepSpec's): a micro-step takes one sequence per process; DSpark/DFlash divide the
weighted loss sums of every process by the weights summed over all processes (every supervised slot
of the micro-step counts equally), Eagle3 divides each sequence's sum by its length (DeepSpec's
local mean); gradient accumulation then averages the micro-steps, each normalised on its own.

Checkpoints: OUT/step_<N>/ is a drafter folder (config.json + model.safetensors) with
trainer_state.json and optimizer.pt beside it; OUT/latest names the newest complete one (written
last, atomically), so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.config import bf16_is_native
from dspark.data.regenerate import read_answers
from dspark.data.tokenize import tokenize_conversation
from dspark.drafters.checkpoint import build_dspark_model, load_drafter_model, new_dspark_config, save_drafter
from dspark.drafters.dspark import DSparkModel
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel
from dspark.train.anchors import Blocks, sample_blocks
from dspark.train.losses import (
    LossOutput, LossWeights, dspark_loss, eagle3_loss, expected_accept_length, log_normalizer, normalised_loss,
    position_weights,
)
from dspark.train.vocab import select_draft_vocab, token_counts


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "dspark"  # dspark | dflash
    drafter: dict = field(default_factory=dict)  # settings for the new drafter (see `dspark drafter init`)
    max_length: int = 1024
    num_anchors: int = 64
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 8  # sequences per optimizer step
    epochs: int = 1
    max_steps: int = 0  # 0: epochs x sequences / grad_accum
    loss: LossWeights = field(default_factory=LossWeights)
    save_every: int = 50
    seed: int = 42
    # bf16 autocast of the drafter's forward: "off", "bf16", or "auto" (on where the hardware has
    # bf16 matmuls: CUDA with bf16, CPUs with AVX512-BF16 or AMX). Losses stay in fp32 either way.
    autocast: str = "off"
    # Keep only one chunk of vocabulary-sized logits and recompute it in the backward pass (for
    # GPU-sized vocabularies x anchors); off by default: storing them is faster where memory allows.
    recompute_logits: bool = False
    # Eagle3 only: supervise at most this many rows per training-time-test step and sequence, drawn
    # at random (0: every row, as DeepSpec). reproduce.py sets num_anchors, DSpark's supervised slots.
    eagle3_rows: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("dspark", "dflash", "eagle3"):
            raise DSparkError(f"training arch {self.arch!r} is not supported; supported: dspark, dflash, eagle3")
        if self.autocast not in ("off", "bf16", "auto"):
            raise DSparkError(f"autocast {self.autocast!r} is not one of: off, bf16, auto")
        for name in ("max_length", "num_anchors", "grad_accum", "epochs", "save_every"):
            if getattr(self, name) <= 0:
                raise DSparkError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.eagle3_rows < 0:
            raise DSparkError(f"eagle3_rows must be 0 (every row) or a positive number of rows, got {self.eagle3_rows}")


def preset_tiny() -> TrainConfig:
    """For tests: tiny blocks, few anchors, a save every 2 steps."""
    return TrainConfig(drafter={"block_size": 4, "markov_rank": 8}, max_length=64, num_anchors=8, lr=3e-3,
                       warmup_ratio=0.0, grad_accum=1, save_every=2)


def preset_dspark_smollm2() -> TrainConfig:
    """SmolLM2-135M on a CPU (the builtin drafter's setting): 2 draft layers, block 7, Markov rank 64
    (its 49k x R input table dominates the weights), a 16k-token draft vocabulary (the drafter's LM
    head and losses cost a third of the 49k vocabulary's; see benchmarks/bench_training.py and
    bench_drafters.py), bf16 products where the CPU has bf16 units, conversations up to 1536 tokens
    (prompts up to 1024 plus their answers)."""
    return TrainConfig(drafter={"num_draft_layers": 2, "block_size": 7, "markov_rank": 64, "draft_vocab_size": 16384},
                       max_length=1536, num_anchors=64, lr=1e-3, grad_accum=8, save_every=50, autocast="auto")


def as_dflash(cfg: TrainConfig) -> TrainConfig:
    """A DSpark setting turned into DFlash as DeepSpec trains it: the same backbone (and draft
    vocabulary), no heads, CE only (position-weighted)."""
    drafter = {k: v for k, v in cfg.drafter.items() if k not in ("markov_rank", "markov_head_type")}
    return replace(cfg, arch="dflash", drafter=drafter, loss=LossWeights(ce=1.0, l1=0.0, confidence=0.0))


def preset_dflash_smollm2() -> TrainConfig:
    """DFlash as DeepSpec trains it: the same backbone and draft vocabulary, no heads, CE only
    (position-weighted)."""
    return as_dflash(preset_dspark_smollm2())


def preset_dspark_qwen3_4b() -> TrainConfig:
    """DeepSpec's Qwen3-4B setting (GPU): 5 layers over target layers [1, 9, 17, 25, 33], block 7,
    rank 256, 512 anchors, mask id 151669, lr 6e-4, global batch 512 sequences, 10 epochs."""
    return TrainConfig(drafter={"num_draft_layers": 5, "block_size": 7, "markov_rank": 256, "mask_token_id": 151669,
                                "target_layer_ids": (1, 9, 17, 25, 33)},
                       max_length=4096, num_anchors=512, lr=6e-4, grad_accum=512, epochs=10, save_every=3000,
                       autocast="auto")


def preset_dspark_gemma4_12b() -> TrainConfig:
    """DeepSpec's Gemma 4 12B setting (GPU): 5 Gemma draft layers over target layers
    [5, 17, 29, 41, 46], block 7, rank 256, 512 anchors, mask id 4 (Gemma's <mask>), lr 6e-4,
    global batch 512 sequences, 10 epochs, sequences up to 4096 tokens."""
    return TrainConfig(drafter={"num_draft_layers": 5, "block_size": 7, "markov_rank": 256, "mask_token_id": 4,
                                "target_layer_ids": (5, 17, 29, 41, 46)},
                       max_length=4096, num_anchors=512, lr=6e-4, grad_accum=512, epochs=10, save_every=3000,
                       autocast="auto")


def preset_dflash_gemma4_12b() -> TrainConfig:
    """DeepSpec's DFlash for Gemma 4 12B: the DSpark setting with both heads off, CE only."""
    return as_dflash(preset_dspark_gemma4_12b())


def preset_eagle3_gemma4_12b() -> TrainConfig:
    """DeepSpec's Eagle3 for Gemma 4 12B: one Gemma draft layer over the same target layers,
    7 training-time-test steps with decay 0.8."""
    return replace(preset_dspark_gemma4_12b(), arch="eagle3",
                   drafter={"block_size": 7, "target_layer_ids": (5, 17, 29, 41, 46)})


def preset_eagle3_smollm2() -> TrainConfig:
    """Eagle3 as DeepSpec trains it (7 training-time-test steps, decay 0.8), sized for this CPU."""
    return replace(preset_dspark_smollm2(), arch="eagle3", drafter={"block_size": 7})


def preset_tiny_eagle3() -> TrainConfig:
    return replace(preset_tiny(), arch="eagle3", drafter={"block_size": 3})


PRESETS = {
    "tiny": preset_tiny,
    "tiny-eagle3": preset_tiny_eagle3,
    "eagle3-smollm2-135m": preset_eagle3_smollm2,
    "dspark-smollm2-135m": preset_dspark_smollm2,
    "dflash-smollm2-135m": preset_dflash_smollm2,
    "dspark-qwen3-4b": preset_dspark_qwen3_4b,
    "dspark-gemma4-12b": preset_dspark_gemma4_12b,
    "dflash-gemma4-12b": preset_dflash_gemma4_12b,
    "eagle3-gemma4-12b": preset_eagle3_gemma4_12b,
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise DSparkError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """`key=value` (training settings) and `drafter.key=value` (drafter settings); values parsed as JSON."""
    from dspark.drafters.checkpoint import parse_overrides

    top, drafter = {}, dict(cfg.drafter)
    fields = {f for f in TrainConfig.__dataclass_fields__ if f not in ("drafter", "loss")}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise DSparkError(f"--set expects key=value, got {pair!r}")
        if key.startswith("drafter."):
            drafter.update(parse_overrides([f"{key.removeprefix('drafter.')}={raw}"]))
        elif key.startswith("loss."):
            name = key.removeprefix("loss.")
            if name not in LossWeights.__dataclass_fields__:
                raise DSparkError(f"unknown loss setting {name!r}; settable: {', '.join(LossWeights.__dataclass_fields__)}")
            top["loss"] = replace(top.get("loss", cfg.loss), **{name: float(raw)})
        elif key in fields:
            kind = type(getattr(cfg, key))
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # a bare string, e.g. autocast=bf16
            if kind is not str and isinstance(value, str):
                raise DSparkError(f"{key}={raw!r} is not a valid {kind.__name__}")
            try:
                top[key] = kind(value)
            except (TypeError, ValueError):
                raise DSparkError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
        else:
            raise DSparkError(f"unknown training setting {key!r}; settable: {', '.join(sorted(fields))}, "
                              "drafter.<setting>, loss.<weight>")
    return replace(cfg, drafter=drafter, **top)


def drafter_config(target: LoadedModel, cfg: TrainConfig):
    """The config of the drafter a training run builds."""
    if cfg.arch == "eagle3":
        from dspark.drafters.eagle3 import new_eagle3_config

        return new_eagle3_config(target, dict(cfg.drafter))
    return new_dspark_config(target, cfg.arch, dict(cfg.drafter))


def build_drafter(target: LoadedModel, cfg: TrainConfig):
    config = drafter_config(target, cfg)
    if cfg.arch == "eagle3":
        from dspark.drafters.eagle3 import build_eagle3_model

        return build_eagle3_model(config, target, seed=cfg.seed)
    return build_dspark_model(config, target, seed=cfg.seed)


def autocast_enabled(mode: str, device: torch.device | str) -> bool:
    """mode "auto": bf16 where `device`, the one the drafter computes on, has bf16 matmul units."""
    if mode == "auto":
        return bf16_is_native(torch.device(device).type)
    return mode == "bf16"


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine to zero (DeepSpec's schedule)."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Sequence:
    input_ids: torch.Tensor  # [S]
    loss_mask: torch.Tensor  # [S]


def load_sequences(data_dir: str | Path, tokenizer, max_length: int) -> list[Sequence]:
    seqs = []
    for record in read_answers(data_dir):
        conv = tokenize_conversation(tokenizer, record["messages"], max_length)
        if sum(conv.loss_mask) >= 2:
            seqs.append(Sequence(torch.tensor(conv.input_ids), torch.tensor(conv.loss_mask)))
    if not seqs:
        raise DSparkError(f"{data_dir} has no answers with at least two assistant tokens")
    return seqs


@torch.no_grad()
def target_features(target: LoadedModel, layers: tuple[int, ...], input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Online features: ([S, L*H] chosen layers' outputs, [S, H] final normed hidden) of one sequence."""
    seq = input_ids.numel()
    out = target.model(input_ids[None], torch.arange(seq)[None], torch.tensor([0]), cache,
                       hidden_layers=layers, compute_logits=False)
    return out.hidden_states[0], out.final_hidden[0]


def block_loss(model: DSparkModel, blocks: Blocks, features: torch.Tensor, final_hidden: torch.Tensor,
               lm_head_w: torch.Tensor, cfg: TrainConfig, target_lse: torch.Tensor | None = None,
               label_index: torch.Tensor | None = None, matmul_dtype: torch.dtype = torch.float32) -> LossOutput:
    """Loss of one sequence's blocks (teacher forcing). With a draft vocabulary: lm_head_w holds its
    rows, label_index [V] maps token ids to their index (-1 outside), target_lse [S] is the target's
    log-normaliser per position."""
    hidden = model.forward_blocks(features[None], blocks.anchor_tokens[None], blocks.anchor_positions[None],
                                  blocks.keep[None])[0]  # [N, K, H]
    rows = blocks.label_mask
    weights = position_weights(model.config.block_size, cfg.loss.decay_gamma).expand_as(rows)[rows]
    head = model.markov_head
    feats = head.block_features(blocks.prev_tokens, hidden)[rows] if head is not None else None
    conf = model.confidence_logits(hidden, blocks.prev_tokens)
    positions = blocks.target_positions[rows]
    labels = blocks.labels[rows]
    if label_index is not None:
        labels = label_index[labels]
    return dspark_loss(hidden[rows], feats, conf[rows] if conf is not None else None,
                       final_hidden[positions], labels, weights, lm_head_w,
                       head.markov_w2.weight if head is not None else None, cfg.loss,
                       target_lse=None if target_lse is None else target_lse[positions],
                       recompute=cfg.recompute_logits, matmul_dtype=matmul_dtype,
                       cap=model.config.target.logit_softcap)


def summed_over_processes(weights: torch.Tensor, world: int) -> torch.Tensor:
    """weights summed over all processes (DeepSpec's _all_reduce_loss_denominators); every process
    must call it once per micro-step. Unchanged when training alone."""
    if world <= 1:
        return weights
    import torch.distributed as dist

    weights = weights.clone()
    dist.all_reduce(weights)
    return weights


def process_loss(sums: torch.Tensor, weights: torch.Tensor, lw: LossWeights,
                 world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of a DSpark micro-step: its weighted sums [3] over the weights [2] summed
    over all processes, times `world` since gradients are then averaged over processes; the averaged
    gradient is that of (all sums) / (all weights), as DeepSpec's _build_loss. Returns (loss, [3] term
    means scaled alike: their average over processes is the micro-step's token-weighted mean)."""
    loss, means = normalised_loss(sums, summed_over_processes(weights, world), lw)
    return loss * world, means.detach() * world


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate_acceptance(target: LoadedModel, drafter_dir: Path, prompt_ids: list[list[int]], max_new_tokens: int = 64) -> float:
    """Real acceptance length of a saved checkpoint through the serving engine (train/serve parity):
    T = 1 sampling with fixed seeds, tau = committed tokens per verify round."""
    from dspark.config import EngineConfig, SamplingParams, StopParams
    from dspark.drafters.checkpoint import load_drafter
    from dspark.engine.engine import Engine, Request

    drafter = load_drafter(drafter_dir, target)
    max_len = max(map(len, prompt_ids)) + max_new_tokens
    engine = Engine(target, drafter, EngineConfig(block_size=drafter.config.block_size,
                                                  max_batch_size=min(8, len(prompt_ids)), max_seq_len=max_len))
    requests = [Request(ids, SamplingParams(temperature=1.0, seed=i), StopParams(max_new_tokens))
                for i, ids in enumerate(prompt_ids)]
    outs = engine.generate(requests)
    rounds = sum(o.stats.rounds for o in outs)
    return sum(o.stats.committed_in_rounds for o in outs) / max(rounds, 1)


class Trainer:
    def __init__(self, target: LoadedModel, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 eval_prompt_ids: list[list[int]] | None = None, tensorboard_dir: str | Path | None = None):
        self.eval_prompt_ids = eval_prompt_ids or []
        self.tensorboard_dir = tensorboard_dir
        self.autocast = autocast_enabled(cfg.autocast, target.model.device)
        # Vocabulary-sized loss products follow autocast (bf16 units make them ~4x faster); fp32 otherwise.
        self.matmul_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.target, self.cfg = target, cfg
        self.out = Path(out_dir)
        self.feature_cache = None
        if (Path(data_dir) / "manifest.json").is_file():  # a feature cache (dspark data cache)
            from dspark.data.feature_cache import FeatureCache

            layers = drafter_config(target, cfg).target_layer_ids
            self.feature_cache = FeatureCache(data_dir, target, layers)
            self.num_sequences = len(self.feature_cache)
        else:
            self.sequences = load_sequences(data_dir, target.tokenizer, cfg.max_length)
            self.num_sequences = len(self.sequences)
            self.cache = target.build_cache(1, cfg.max_length, headroom=0)
        self.lm_head_w = target.model.lm_head.weight.detach().float()
        per_epoch = math.ceil(self.num_sequences / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * per_epoch
        self.rank, self.world = _rank_and_world()
        self.step, self.epoch, self.index = 0, 0, 0
        self.tokens_seen = 0  # sequence tokens trained on so far, over all processes (the learning curve's x)
        # Where a step's time goes (seconds summed since construction) and the sequence tokens seen:
        # features (online: the target forward; cached: reading), forward (drafter and losses),
        # backward, optimizer (clipping included).
        self.timings = dict.fromkeys(("features_s", "forward_s", "backward_s", "optimizer_s", "tokens"), 0.0)
        self.anchor_gen = torch.Generator().manual_seed(cfg.seed + self.rank)
        latest = self.out / "latest"
        if latest.is_file():
            self._resume(self.out / latest.read_text().strip())
        else:
            self.model = self._trainable(build_drafter(target, cfg))
            self._choose_draft_vocab()
            self.optimizer = self._optimizer()
        self._setup_draft_vocab()

    def _choose_draft_vocab(self) -> None:
        """A new drafter with a draft vocabulary: the most frequent assistant tokens of the data."""
        size = getattr(self.model.config, "draft_vocab_size", 0)
        if not size:
            return
        vocab = self.target.vocab_size
        if self.feature_cache is not None:
            pairs = list(self.feature_cache.token_pairs())
        else:
            pairs = [(s.input_ids, s.loss_mask) for s in self.sequences]
        counts = token_counts(pairs, vocab)
        ids = select_draft_vocab(counts, size, self.target.eos_token_ids, tie_counts=token_counts(pairs, vocab, False))
        self.model.draft_vocab.copy_(ids)

    def _setup_draft_vocab(self) -> None:
        """Loss-side views, made once in the precision of the loss products: the head the drafter
        predicts over (its draft vocabulary's LM-head rows), the token -> index map and the full head
        for the target's log-normaliser."""
        self.head_w, self.label_index, self.lse_head_w = self.lm_head_w.to(self.matmul_dtype), None, None
        vocab_ids = getattr(self.model, "draft_vocab", None)
        if vocab_ids is None:
            return
        self.lse_head_w = self.head_w
        self.head_w = self.lse_head_w.index_select(0, vocab_ids)
        self.label_index = torch.full((self.lm_head_w.shape[0],), -1, dtype=torch.long)
        self.label_index[vocab_ids] = torch.arange(vocab_ids.numel())

    def _trainable(self, model: DSparkModel) -> DSparkModel:
        return model.float().train().requires_grad_(True)

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _resume(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved, wanted = dict(state["train_config"]), _jsonable(self.cfg)
        extendable = ("max_steps", "epochs", "save_every")  # train longer / save more often: the run stays meaningful
        if {k: v for k, v in saved.items() if k not in extendable} != {k: v for k, v in wanted.items() if k not in extendable}:
            changed = sorted(k for k in set(saved) | set(wanted) if k not in extendable and saved.get(k) != wanted.get(k))
            raise DSparkError(f"{self.out} holds a run with other settings ({', '.join(changed)}); only "
                              f"{', '.join(extendable)} may change on resume; use a new --out (nothing was changed)")
        if self.total_steps < state["step"]:
            raise DSparkError(f"{self.out} is at step {state['step']}, past the {self.total_steps} steps asked for; "
                              "raise max_steps or epochs to continue it")
        if state.get("total_steps", self.total_steps) != self.total_steps:
            print(f"resuming {self.out} at step {state['step']} with {self.total_steps} steps in all "
                  f"(was {state['total_steps']}): the learning-rate schedule is recomputed for the new length")
        if state.get("world_size", 1) != self.world:
            raise DSparkError(f"{self.out} was trained with {state.get('world_size', 1)} processes; resume it with "
                              f"the same number (got {self.world}) for an exact resume")
        self.model = self._trainable(load_drafter_model(ckpt, self.target))
        self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.anchor_gen.set_state(torch.load(ckpt / f"rng.rank{self.rank}.pt", weights_only=True))
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]
        self.tokens_seen = state.get("tokens_seen", 0)

    def _next_sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids [S], loss_mask [S], features [S, L*H], final_hidden [S, H], target_lse [S] or None)
        of the next sequence; the log-normaliser only where a draft vocabulary needs it."""
        order = torch.randperm(self.num_sequences, generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
        # Each micro-step consumes `world` sequences of the epoch's order; rank r takes the r-th.
        k = int(order[(self.index + self.rank) % self.num_sequences])
        self.index += self.world
        if self.index >= self.num_sequences:
            self.epoch, self.index = self.epoch + 1, 0
        if self.feature_cache is not None:
            c = self.feature_cache[k]
            input_ids, loss_mask, features, final_hidden, lse = c.input_ids, c.loss_mask, c.features, c.final_hidden, c.target_lse
        else:
            seq = self.sequences[k]
            features, final_hidden = target_features(self.target, self.model.config.target_layer_ids, seq.input_ids,
                                                     self.cache)
            input_ids, loss_mask, lse = seq.input_ids, seq.loss_mask, None
        if self.label_index is None:
            lse = None
        elif lse is None:
            lse = log_normalizer(final_hidden, self.lse_head_w, matmul_dtype=self.matmul_dtype,
                                 cap=self.target.logit_softcap)
        return input_ids, loss_mask, features, final_hidden, lse

    def _sequence_loss(self, input_ids, loss_mask, features, final_hidden, target_lse=None):
        """(loss, {ce, l1, confidence}, tau estimate) of this process's sequence, or None when nothing
        is supervised. DSpark/DFlash losses are normalised over the micro-step's sequences on all
        processes, so every process joins that reduction, supervised or not."""
        cfg, model = self.cfg, self.model
        if cfg.arch == "eagle3":
            steps = model.forward_ttt(features[None], input_ids[None], steps=model.config.block_size)
            loss, accepts = eagle3_loss([h[0] for h in steps], final_hidden, loss_mask, self.head_w, cfg.loss,
                                        cap=self.target.logit_softcap, matmul_dtype=self.matmul_dtype,
                                        recompute=cfg.recompute_logits, max_rows=cfg.eagle3_rows,
                                        generator=self.anchor_gen)
            if not loss.requires_grad:
                return None
            means = [float(a.mean()) if a.numel() else 0.0 for a in accepts]
            tau = 1 + sum(math.prod(means[: k + 1]) for k in range(len(means)))
            return loss, {"ce": float(loss.detach())}, tau
        blocks = sample_blocks(input_ids, loss_mask, cfg.num_anchors, model.config.block_size, self.anchor_gen)
        if not bool(blocks.label_mask.any()):
            summed_over_processes(torch.zeros(2), self.world)
            return None
        out = block_loss(model, blocks, features, final_hidden, self.head_w, cfg, target_lse, self.label_index,
                         self.matmul_dtype)
        loss, means = process_loss(out.sums, out.weights, cfg.loss, self.world)
        parts = dict(zip(("ce", "l1", "confidence"), means.tolist()))
        return loss, parts, expected_accept_length(out.acceptance, blocks.label_mask)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum sequences; returns its metrics."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = {"loss": 0.0, "ce": 0.0, "l1": 0.0, "confidence": 0.0}
        taus = []
        device = "cuda" if self.lm_head_w.is_cuda else "cpu"
        clock = time.perf_counter
        for _ in range(cfg.grad_accum):
            t0 = clock()
            input_ids, loss_mask, features, final_hidden, target_lse = self._next_sequence()
            t1 = clock()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
                loss_out = self._sequence_loss(input_ids, loss_mask, features, final_hidden, target_lse)
            t2 = clock()
            self.timings["features_s"] += t1 - t0
            self.timings["forward_s"] += t2 - t1
            self.timings["tokens"] += input_ids.numel()
            self.tokens_seen += input_ids.numel() * self.world
            if loss_out is None:
                continue
            loss, parts, tau = loss_out
            (loss / cfg.grad_accum).backward()
            self.timings["backward_s"] += clock() - t2
            totals["loss"] += float(loss.detach()) / cfg.grad_accum
            for key, value in parts.items():
                totals[key] += value / cfg.grad_accum
            taus.append(tau)
        if self.world > 1:  # data parallel: average gradients and metrics over processes
            import torch.distributed as dist

            for param in model.parameters():
                if param.grad is None:  # every rank must join every all-reduce
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
                param.grad /= self.world
            stats = torch.tensor([totals["loss"], totals["ce"], totals["l1"], totals["confidence"]], dtype=torch.float64)
            dist.all_reduce(stats)
            totals = dict(zip(("loss", "ce", "l1", "confidence"), (stats / self.world).tolist()))
        t0 = clock()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.timings["optimizer_s"] += clock() - t0
        self.step += 1
        return {"step": self.step, "tokens_seen": self.tokens_seen, **totals,
                "tau_estimate": sum(taus) / len(taus) if taus else math.nan,
                "lr": lr, "grad_norm": float(grad_norm)}

    def save(self) -> Path:
        """Rank 0 writes the drafter folder, optimizer and state; every rank its RNG; `latest` comes last."""
        ckpt = self.out / f"step_{self.step}"
        if self.rank == 0:
            save_drafter(self.model, ckpt, overwrite=True)
            torch.save(self.optimizer.state_dict(), ckpt / "optimizer.pt")
            state = {"step": self.step, "epoch": self.epoch, "index": self.index, "total_steps": self.total_steps,
                     "tokens_seen": self.tokens_seen,
                     "world_size": self.world, "train_config": _jsonable(self.cfg)}
            (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _barrier(self.world)
        torch.save(self.anchor_gen.get_state(), ckpt / f"rng.rank{self.rank}.pt")
        _barrier(self.world)
        if self.rank == 0:
            _atomic_write(self.out / "latest", ckpt.name)  # last: only complete checkpoints are named
        return ckpt

    def run(self, progress: bool = True, time_budget_s: float | None = None) -> Path:
        """Train to total_steps (or until time_budget_s has passed: the step then in progress ends,
        a checkpoint is saved, and a rerun resumes from it). Returns the newest checkpoint."""
        deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
        self.out.mkdir(parents=True, exist_ok=True)
        lead = self.rank == 0
        if lead:  # a run killed after its last checkpoint logged steps that will be trained again
            _drop_log_lines_after(self.out / "train_log.jsonl", self.step)
        log = open(self.out / "train_log.jsonl", "a", encoding="utf-8") if lead else open(os.devnull, "w")
        board = None
        if self.tensorboard_dir and lead:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DSparkError("--tensorboard needs the tensorboard package: pip install 'dspark[train]'") from None
            board = SummaryWriter(str(self.tensorboard_dir))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not (progress and lead))
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                metrics = self.train_step()
                metrics["seconds"] = time.perf_counter() - start
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if board is not None:
                    for key, value in metrics.items():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tau=f"{metrics['tau_estimate']:.2f}")
                out_of_time = deadline is not None and _agreed(time.monotonic() >= deadline, self.world)
                if self.step % self.cfg.save_every == 0 or self.step == self.total_steps or out_of_time:
                    ckpt = self.save()
                    if self.eval_prompt_ids and lead:
                        tau = evaluate_acceptance(self.target, ckpt, self.eval_prompt_ids)
                        log.write(json.dumps({"step": self.step, "eval_accept_length": tau}) + "\n")
                        log.flush()
                        if board is not None:
                            board.add_scalar("eval/accept_length", tau, self.step)
                        bar.write(f"step {self.step}: accept length on held-out prompts {tau:.3f}")
                if out_of_time:
                    bar.write(f"time budget spent at step {self.step}; rerun to resume")
                    break
        finally:
            bar.close()
            log.close()
            if board is not None:
                board.close()
        _barrier(self.world)
        return self.out / (self.out / "latest").read_text().strip()


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _drop_log_lines_after(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (as TensorBoard's purge_step does for event files)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line
    _atomic_write(path, "".join(line + "\n" for line in kept))


def _agreed(flag: bool, world: int) -> bool:
    """True on every process when it is true on any (so all stop at the same step)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def init_distributed() -> bool:
    """Join the process group torchrun describes; False when run alone. gloo, also on a host with
    GPUs: the trainer computes and reduces on the CPU, and NCCL takes only CUDA tensors."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo")
    return True


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=list))
