"""Build a drafter from its name (the CLI's --drafter), including the builtin drafters shipped
with the package (`drafters/builtin/<name>/`: a drafter folder plus `card.json`, which says how it
was trained and what it measured)."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.drafters.base import Drafter
from dspark.drafters.checkpoint import load_drafter
from dspark.drafters.draft_model import DraftModelDrafter, check_same_vocabulary
from dspark.drafters.simple import LOOKUP_SUFFIX, LookupFirstDrafter, NgramDrafter, NoDrafter, behind_lookup
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel, load_model

DRAFTERS = ("auto", "builtin", "none", "ngram", "draft-model", "a drafter folder (dspark drafter init / training)",
            "any of these model drafters + ngram (prompt lookup first, e.g. builtin+ngram)")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_drafters() -> dict[str, Path]:
    """Name -> folder of every builtin drafter shipped with the package."""
    if not BUILTIN_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(BUILTIN_DIR.iterdir()) if (d / "config.json").is_file()}


def builtin_drafter_for(target: LoadedModel) -> Path | None:
    """The builtin drafter made for this target (matched by the target's weight fingerprint), if any."""
    for folder in builtin_drafters().values():
        made_for = json.loads((folder / "config.json").read_text())["config"]["target"]
        if made_for.get("fingerprint") == target.fingerprint:
            return folder
    return None


def resolve_drafter_name(name: str, target: LoadedModel) -> str:
    """What a drafter name stands for with this target. `builtin`: the target's builtin drafter
    folder (an error without one); `auto`: that folder with prompt lookup in front (`<folder>+ngram`,
    the fastest measured default, docs/drafters.md), or `ngram` for targets without one;
    `<name>+ngram`: <name> resolved, the suffix kept."""
    if (inner_name := behind_lookup(name)) is not None:
        inner = resolve_drafter_name(inner_name, target)
        return inner if behind_lookup(inner) is not None else inner + LOOKUP_SUFFIX
    if name not in ("auto", "builtin"):
        return str(builtin_drafters().get(name, name))
    folder = builtin_drafter_for(target)
    if folder is not None:
        return str(folder) + (LOOKUP_SUFFIX if name == "auto" else "")
    if name == "builtin":
        names = ", ".join(builtin_drafters()) or "none"
        raise DSparkError(f"target {target.spec!r} has no builtin drafter (builtin drafters: {names}); "
                          "use ngram, none, draft-model or a drafter folder")
    return "ngram"


def build_drafter(
    name: str, target: LoadedModel, draft_model: str | None = None, dtype: str = "bf16"
) -> Drafter:
    """auto: the target's builtin drafter with prompt lookup in front if it has one, else ngram;
    builtin: the builtin drafter alone (an error for targets without one); a builtin drafter's name; none, ngram, draft-model, a folder;
    any model drafter + `+ngram` (LookupFirstDrafter: prompt lookup where it finds a match)."""
    name = resolve_drafter_name(name, target)
    if (inner_name := behind_lookup(name)) is not None:
        return LookupFirstDrafter(build_drafter(inner_name, target, draft_model, dtype))
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
