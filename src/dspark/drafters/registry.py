"""Build a drafter from its name (the CLI's --drafter)."""

from __future__ import annotations

from pathlib import Path

from dspark.drafters.base import Drafter
from dspark.drafters.checkpoint import load_drafter
from dspark.drafters.draft_model import DraftModelDrafter, check_same_vocabulary
from dspark.drafters.simple import NgramDrafter, NoDrafter
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel, load_model

DRAFTERS = ("none", "ngram", "draft-model", "a drafter folder (dspark drafter init / training)")


def build_drafter(
    name: str, target: LoadedModel, draft_model: str | None = None, dtype: str = "bf16"
) -> Drafter:
    if name == "none":
        return NoDrafter()
    if name == "ngram":
        return NgramDrafter()
    if name == "draft-model":
        if not draft_model:
            raise DSparkError("--drafter draft-model needs --draft-model SPEC (a builtin name, .gguf file or HF folder)")
        draft = load_model(draft_model, dtype)
        check_same_vocabulary(draft, target)
        return DraftModelDrafter(draft)
    if Path(name).is_dir():
        return load_drafter(name, target)
    raise DSparkError(f"unknown drafter {name!r}; choose one of: {', '.join(DRAFTERS)}")
