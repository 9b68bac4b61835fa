"""Typed, frozen configuration objects shared by the engine, drafters and CLI.

Every default is declared once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.errors import DSparkError


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature below GREEDY_BELOW (1e-5, as vLLM) means greedy
    (argmax): dividing logits by a smaller one overflows and is the argmax in the limit anyway.
    temperature must be finite (a uniform limit is not offered)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature < float("inf")):
            raise DSparkError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise DSparkError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise DSparkError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise DSparkError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class StopParams:
    """When one request stops. The engine knows token ids only; stop strings are checked at the edge."""

    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise DSparkError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """Engine capacity and drafting width."""

    block_size: int = 8  # K: the most draft tokens verified per request per round
    max_batch_size: int = 8  # request slots
    max_seq_len: int = 2048  # context length per request (prompt + generated)

    def __post_init__(self) -> None:
        if self.block_size < 0:
            raise DSparkError(f"block_size must be >= 0, got {self.block_size}")
        if self.max_batch_size <= 0:
            raise DSparkError(f"max_batch_size must be a positive integer, got {self.max_batch_size}")
        if self.max_seq_len <= 0:
            raise DSparkError(f"max_seq_len must be a positive integer, got {self.max_seq_len}")


DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "fp16": "float16"}


def bf16_is_native(device_type: str = "cpu") -> bool:
    """Whether bf16 matrix products run on native units: a CUDA device with bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere they are emulated, several times slower than fp32 once more than
    a few rows are multiplied (docs/benchmarks.md, "Hardware: fixed and auto verification")."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str) -> str:
    """'auto' -> 'bf16' where the CPU (targets load there) has native bf16 products, else 'fp32':
    twice the memory, but a compute-bound job (a prefill, a batched regeneration, a feature cache)
    runs several times faster. Any other name is returned as it is."""
    if name == "auto":
        return "bf16" if bf16_is_native("cpu") else "fp32"
    return name


def torch_dtype(name: str):
    """'auto' | 'bf16' | 'fp32' | 'fp64' | 'fp16' -> torch dtype, with a clear error otherwise."""
    import torch

    name = resolve_dtype(name)
    if name not in DTYPES:
        raise DSparkError(f"dtype {name!r} is not one of {sorted(['auto', *DTYPES])}")
    return getattr(torch, DTYPES[name])
