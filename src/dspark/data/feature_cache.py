"""Target-feature cache: the frozen target's features of every training sequence, written once and
memory-mapped at training time (DeepSpec's `prepare_target_cache.py`, §4.3, in a compact layout).

Layout of a cache folder:
  manifest.json            target spec + fingerprint, layer ids, dtype, hidden size, shards with
                           their sequence counts, token counts and sha256
  shard_00000.safetensors  input_ids [T] int32, loss_mask [T] uint8, offsets [n + 1] int64,
                           features [T, L*H] (chosen layers' outputs), final_hidden [T, H],
                           target_lse [T] fp32 (the target's log-normaliser over the full
                           vocabulary at each position, from the stored final hidden: what a
                           drafter with a draft vocabulary needs to train without the 49k-row head)
A shard is written to a temporary name, checksummed and renamed, and the manifest is rewritten after
each shard, so a killed run resumes at the first missing shard and never leaves a torn one.

Bytes per token: DeepSpec stores 6 + 12*H (bf16 features of 5 layers + final hidden, int32 ids,
uint16 mask, for H the hidden size); here 5 + 2*(L+1)*H in bf16/fp16 (the same for L = 5), or
5 + (L+1)*H with fp8 features (`compact`), which halves the cache at a small loss of precision.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.errors import DSparkError
from dspark.models.loading import file_sha256

CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
MANIFEST = "manifest.json"


def bytes_per_token(hidden: int, num_layers: int, dtype: str) -> int:
    return 4 + 1 + 4 + (num_layers + 1) * hidden * torch.tensor([], dtype=CACHE_DTYPES[dtype]).element_size()


def deepspec_bytes_per_token(hidden: int) -> int:
    return 6 + 12 * hidden


@dataclass
class CachedSequence:
    input_ids: torch.Tensor  # [S]
    loss_mask: torch.Tensor  # [S]
    features: torch.Tensor  # [S, L*H]
    final_hidden: torch.Tensor  # [S, H]
    target_lse: torch.Tensor | None = None  # [S] fp32 (absent in caches written before it existed)


def write_cache(target, sequences, layer_ids: tuple[int, ...], out_dir, dtype: str = "bf16",
                shard_size: int = 64, progress: bool = True) -> dict:
    """sequences: objects with input_ids [S] and loss_mask [S]. Resumes at the first missing shard."""
    from safetensors.torch import save_file

    from dspark.train.losses import log_normalizer

    if dtype not in CACHE_DTYPES:
        raise DSparkError(f"cache dtype {dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = target.model.args
    header = {"format": "dspark-feature-cache", "version": 2, "target_fingerprint": target.fingerprint,
              "architecture": args.architecture, "hidden_size": args.hidden_size, "vocab_size": args.vocab_size,
              "layer_ids": list(layer_ids), "dtype": dtype, "shard_size": shard_size, "num_sequences": len(sequences)}
    manifest_path = out / MANIFEST
    manifest = {**header, "shards": []}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in header} != header:
            raise DSparkError(f"{out} holds a cache with other settings; use a new --out (nothing was changed)")
        manifest["shards"] = [s for s in old["shards"] if (out / s["file"]).is_file()]
    starts = range(len(manifest["shards"]) * shard_size, len(sequences), shard_size)
    cache = target.build_cache(1, max(s.input_ids.numel() for s in sequences), headroom=0)
    # The log-normaliser's 49k-row product in bf16 where the hardware has bf16 units and the target
    # runs in bf16 (as training's products then do), else fp32; the head converted once.
    from dspark.models.llama import native_bf16_matmul

    head = target.model.lm_head.weight.detach()
    lse_dtype = torch.bfloat16 if head.dtype == torch.bfloat16 and native_bf16_matmul(head.device) else torch.float32
    lm_head_w = head.to(lse_dtype)
    bar = tqdm(total=len(sequences), initial=len(manifest["shards"]) * shard_size, desc="cache", unit="seq",
               disable=not progress)
    with torch.inference_mode():
        for start in starts:
            chunk = sequences[start : start + shard_size]
            feats, finals, lses = [], [], []
            for seq in chunk:
                n = seq.input_ids.numel()
                o = target.model(seq.input_ids[None], torch.arange(n)[None], torch.tensor([0]), cache,
                                 hidden_layers=layer_ids, compute_logits=False)
                feats.append(o.hidden_states[0].to(CACHE_DTYPES[dtype]))
                finals.append(o.final_hidden[0].to(CACHE_DTYPES[dtype]))
                lses.append(log_normalizer(finals[-1], lm_head_w, matmul_dtype=lse_dtype,  # from what training reads
                                           cap=target.logit_softcap))
                bar.update(1)
            lengths = torch.tensor([0] + [s.input_ids.numel() for s in chunk])
            tensors = {"input_ids": torch.cat([s.input_ids for s in chunk]).to(torch.int32),
                       "loss_mask": torch.cat([s.loss_mask for s in chunk]).to(torch.uint8),
                       "offsets": lengths.cumsum(0), "features": torch.cat(feats), "final_hidden": torch.cat(finals),
                       "target_lse": torch.cat(lses)}
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            tmp = out / (name + ".tmp")
            save_file(tensors, str(tmp))
            digest = file_sha256(tmp)
            os.replace(tmp, out / name)
            manifest["shards"].append({"file": name, "sequences": len(chunk), "tokens": int(lengths.sum()), "sha256": digest})
            tmp_manifest = out / (MANIFEST + ".tmp")
            tmp_manifest.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp_manifest, manifest_path)
    bar.close()
    return manifest


class FeatureCache:
    """Reads a cache folder; shards are memory-mapped by safetensors and checked against the manifest."""

    def __init__(self, path, target, layer_ids: tuple[int, ...], verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DSparkError(f"{self.path} is not a feature cache: {MANIFEST} is missing")
        self.manifest = json.loads(manifest_path.read_text())
        m = self.manifest
        if m["target_fingerprint"] != target.fingerprint:
            raise DSparkError(f"cache {self.path} was made for another target (fingerprint {m['target_fingerprint']}, "
                              f"target {target.spec!r} has {target.fingerprint})")
        if tuple(m["layer_ids"]) != tuple(layer_ids):
            raise DSparkError(f"cache {self.path} holds layers {m['layer_ids']}, the drafter needs {list(layer_ids)}")
        present = [s for s in m["shards"] if (self.path / s["file"]).is_file()]
        if len(present) < len(m["shards"]) or sum(s["sequences"] for s in present) < m["num_sequences"]:
            raise DSparkError(f"cache {self.path} is incomplete; rerun `dspark data cache` to finish it")
        if verify:
            for shard in m["shards"]:
                if file_sha256(self.path / shard["file"]) != shard["sha256"]:
                    raise DSparkError(f"{self.path / shard['file']} does not match its checksum: the cache is corrupt")
        self._index = [(i, j) for i, shard in enumerate(m["shards"]) for j in range(shard["sequences"])]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, i: int):
        from safetensors import safe_open

        if i not in self._open:
            self._open[i] = safe_open(str(self.path / self.manifest["shards"][i]["file"]), framework="pt")
        return self._open[i]

    def __getitem__(self, k: int) -> CachedSequence:
        i, j = self._index[k]
        shard = self._shard(i)
        offsets = shard.get_tensor("offsets")
        a, b = int(offsets[j]), int(offsets[j + 1])
        lse = shard.get_slice("target_lse")[a:b].float() if "target_lse" in shard.keys() else None
        return CachedSequence(
            shard.get_slice("input_ids")[a:b].long(), shard.get_slice("loss_mask")[a:b].long(),
            shard.get_slice("features")[a:b].float(), shard.get_slice("final_hidden")[a:b].float(), lse,
        )

    def token_pairs(self):
        """(input_ids, loss_mask) of every shard, without reading features."""
        for i in range(len(self.manifest["shards"])):
            shard = self._shard(i)
            yield shard.get_tensor("input_ids"), shard.get_tensor("loss_mask")
