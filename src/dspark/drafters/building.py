"""Building drafter models for a target: the target they were made for (`TargetSpec`), the check
against it, DeepSpec's initialisation, a model that shares the target's embedding, LM head and
RoPE, and exact state-dict loading. The lowest drafter layer below the formats that read and write
drafters (checkpoint.py: dspark folders; deepspec.py: DeepSpec folders), so that those import it
and not each other.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark.drafters.dspark import DSparkConfig, DSparkModel, TargetSpec
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel


def target_spec_of(target: LoadedModel) -> TargetSpec:
    args = target.model.args
    return TargetSpec(args.architecture, args.hidden_size, args.vocab_size, args.num_layers, target.fingerprint,
                      target.logit_softcap)


def check_target(spec: TargetSpec, target: LoadedModel, where: str) -> None:
    """Refuse a target other than the one the drafter was made for, naming the mismatch."""
    args = target.model.args
    for name in ("architecture", "hidden_size", "vocab_size", "num_layers", "fingerprint"):
        want = getattr(spec, name)
        got = target.fingerprint if name == "fingerprint" else getattr(args, name)
        if want is not None and want != got:
            raise DSparkError(
                f"drafter {where} was made for a target with {name} {want!r}, but target {target.spec!r} has {got!r}"
            )


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """DeepSpec's initialisation: linear and embedding weights N(0, std), biases 0, norms 1."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std)
        elif hasattr(sub, "weight") and type(sub).__name__ == "RMSNorm":
            nn.init.ones_(sub.weight)


def build_sharing_model(model_cls, config, target: LoadedModel, seed: int | None = 0) -> nn.Module:
    """A drafter model sharing the target's embedding, LM head and RoPE, randomly initialised
    (seed None: leave the global RNG alone, e.g. before loading weights), frozen, in the target's dtype."""
    tm = target.model
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(config, tm.model.embed_tokens, tm.lm_head, tm.inv_freq, tm.rope_scale)
    init_weights(model)
    return model.to(tm.dtype).eval().requires_grad_(False)


def build_dspark_model(config: DSparkConfig, target: LoadedModel, seed: int | None = 0) -> DSparkModel:
    return build_sharing_model(DSparkModel, config, target, seed)


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], problem: str, dtype: torch.dtype) -> None:
    """Load a state dict whose keys must be exactly the model's; otherwise fail with `problem`."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise DSparkError(f"{problem}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
