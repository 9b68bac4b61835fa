"""PNG plots of evaluation results (matplotlib, headless). Each function writes one file and returns
its path; inputs are the plain dicts of results.json, so plots can be redrawn from a saved run."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the eval extra is part of the test install
        raise ImportError("plots need matplotlib: pip install 'dspark[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)  # off pyplot's registry: a long evaluation draws many
    return path


def plot_tau(per_benchmark: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bars: accept length tau per benchmark (groups) and drafter (bars)."""
    plt = _pyplot()
    benches = list(per_benchmark)
    drafters = sorted({d for v in per_benchmark.values() for d in v})
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(benches) + 2), 3.6))
    width = 0.8 / max(len(drafters), 1)
    for i, d in enumerate(drafters):
        xs = [b + (i - (len(drafters) - 1) / 2) * width for b in range(len(benches))]
        ax.bar(xs, [per_benchmark[b].get(d, math.nan) for b in benches], width, label=d)
    ax.set_xticks(range(len(benches)), benches, rotation=20)
    ax.set_ylabel("accept length tau (bonus included)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_conditional_acceptance(per_domain: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """One panel per domain, one line per drafter: conditional acceptance at each draft position."""
    plt = _pyplot()
    domains = list(per_domain)
    fig, axes = plt.subplots(1, max(len(domains), 1), figsize=(3.4 * max(len(domains), 1), 3.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for drafter, values in per_domain[domain].items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=drafter)
        ax.set_title(domain)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("conditional acceptance")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_threshold_sweep(per_domain: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Paper Fig. 5 analog: stacked accepted/rejected drafts per round (bars), acceptance rate (line)."""
    plt = _pyplot()
    domains = list(per_domain)
    fig, axes = plt.subplots(1, max(len(domains), 1), figsize=(3.6 * max(len(domains), 1), 3.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        rows = per_domain[domain]
        xs = [r["threshold"] for r in rows]
        acc = [r["accepted_per_round"] for r in rows]
        rej = [r["rejected_per_round"] for r in rows]
        w = 0.8 * (xs[1] - xs[0]) if len(xs) > 1 else 0.08
        ax.bar(xs, acc, w, label="accepted")
        ax.bar(xs, rej, w, bottom=acc, label="rejected", hatch="//", alpha=0.6)
        twin = ax.twinx()
        twin.plot(xs, [r["acceptance_rate"] for r in rows], color="black", marker=".", label="acceptance rate")
        twin.set_ylim(0, 1.05)
        ax.set_title(f"{domain} {title}".strip())
        ax.set_xlabel("confidence threshold")
    axes[0][0].set_ylabel("drafts verified per round")
    axes[0][0].legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_reliability(before: dict, after: dict | None, path: str | Path, positions: list[int] | None = None) -> Path:
    """Reliability diagrams of prefix survival per position (paper Fig. 6): before/after calibration.

    before/after: calibration_metrics() dicts. positions: 1-based positions to show (default: up to 4
    spread over the block).
    """
    plt = _pyplot()
    per = before["positions"]
    if positions is None:
        k = len(per)
        positions = sorted({1 + round(i * (k - 1) / 3) for i in range(min(4, k))}) if k else []
    fig, axes = plt.subplots(1, max(len(positions), 1), figsize=(3.0 * max(len(positions), 1), 3.2), squeeze=False)
    for ax, pos in zip(axes[0], positions):
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="perfect")
        for name, metrics in (("before", before), ("after", after)):
            if metrics is None:
                continue
            p = metrics["positions"][pos - 1]
            bins = p["reliability"]
            ax.plot([b["mean_pred"] for b in bins], [b["observed"] for b in bins], marker="o", ms=3,
                    label=f"{name} ECE {100 * p['ece']:.1f}%")
        ax.set_title(f"position {pos} (AUC {before['positions'][pos - 1]['auroc']:.2f})", fontsize=9)
        ax.set_xlabel("predicted survival")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("observed survival")
    return _save(fig, path)
