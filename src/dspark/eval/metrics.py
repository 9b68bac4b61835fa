"""Acceptance metrics, defined once, from per-round logs of (verified n, accepted a, committed c).

  accept length tau       = sum c / rounds (bonus included; a round cut by a stop token counts what it
                            committed, as DeepSpec's final stop-token round contributes a, not a + 1)
  verified per round      = sum n / rounds
  acceptance rate         = sum a / sum n
  prefix survival @k      = #{a > k} / #{n > k}   (DeepSpec's accept_rate@k)
  conditional accept @k   = #{a > k} / #{a >= k and n > k}   (paper Fig. 2: among rounds whose first
                            k drafts were accepted and whose draft k was verified, the share accepted)
(k is 0-based: draft position k + 1 in the paper's numbering.)
"""

from __future__ import annotations

from collections.abc import Iterable


def summarize_rounds(rounds: Iterable[tuple[int, int, int]], max_positions: int | None = None) -> dict:
    rounds = list(rounds)
    if not rounds:
        return {"rounds": 0, "accept_length": float("nan"), "verified_per_round": float("nan"),
                "acceptance_rate": float("nan"), "prefix_survival": [], "conditional_acceptance": [],
                "position_rounds": []}
    width = max_positions if max_positions is not None else max(n for n, _, _ in rounds)
    verified = sum(n for n, _, _ in rounds)
    survival, conditional, position_rounds = [], [], []
    for k in range(width):
        survived = sum(1 for n, a, _ in rounds if a > k)
        offered = sum(1 for n, _, _ in rounds if n > k)
        reached = sum(1 for n, a, _ in rounds if a >= k and n > k)
        survival.append(survived / offered if offered else float("nan"))
        conditional.append(survived / reached if reached else float("nan"))
        position_rounds.append(reached)
    return {
        "rounds": len(rounds),
        "accept_length": sum(c for _, _, c in rounds) / len(rounds),
        "verified_per_round": verified / len(rounds),
        "acceptance_rate": sum(a for _, a, _ in rounds) / verified if verified else float("nan"),
        "prefix_survival": survival,
        "conditional_acceptance": conditional,
        "position_rounds": position_rounds,  # rounds that reached each position: the denominators above
    }
