"""Prefill, step and generate over a batch of requests held in cache slots.

One round (ENGINE-NOTES): every running request's drafter proposes up to K tokens; a verification
policy picks how many of them to verify (any length vector stays lossless, provided the choice for
position k does not look at the drafted token k); one target forward verifies all rows' ragged
blocks; rejection sampling accepts a prefix and adds one recovered or bonus token; target and
drafter caches roll back to the committed tokens by setting lengths. Requests join (prefill) and
leave between rounds. The engine knows token ids only.

Failures: work done for one request alone (sampling its first token, verifying its row, committing
its tokens, its stop checker, its drafter slot's begin/commit/release) is isolated per request: when
it raises, that request ends with finish_reason "error" (the exception on its output), its slots
are freed, and the round goes on for the others, whose outputs do not change (each row has its own
generator and cache slot). Batched work shared by every row (the prefill and verify forwards, the
drafter's propose, the policy) raises out of `step`: no row can be trusted after it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dspark.config import EngineConfig, SamplingParams, StopParams
from dspark.drafters.base import DraftRequest, Drafter, Proposal
from dspark.engine.verify import verify_ragged
from dspark.errors import DSparkError
from dspark.models.target import LoadedModel
from dspark.sampling import logits_to_probs, make_generator, sample_rows

log = logging.getLogger(__name__)

DRAFT_TIMES = 8  # drafting rounds whose median time plan() is told

# policy(draft_requests, proposals) -> verification length per row, each in [0, len(proposal)].
# A policy may also define observe(draft_requests, lengths, num_accepted, survival=None), called
# after each verification (e.g. to estimate acceptance for drafters without confidences; survival:
# per row, VerifyResult.survival, each verified prefix's acceptance probability given the drafts), and
# plan(draft_requests, draft_seconds) -> most tokens each request may draft, called before drafting
# with the engine's recent draft time per round. A policy must decide a row's length for position k
# without looking at the drafted token at k (paper Appendix A).
Policy = Callable[[Sequence[DraftRequest], Sequence[Proposal]], Sequence[int]]


def verify_all(requests: Sequence[DraftRequest], proposals: Sequence[Proposal]) -> list[int]:
    """The fixed policy: verify everything that was drafted."""
    return [len(p) for p in proposals]


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopParams = field(default_factory=StopParams)
    request_id: str | int | None = None
    # Called with the generated ids after each round; True ends the request (stop strings live at
    # the text edge, which supplies this).
    stop_checker: Callable[[list[int]], bool] | None = None


@dataclass
class RequestStats:
    """Per-request statistics. accept_length (tau) = committed tokens per verify round, bonus included."""

    rounds: int = 0
    committed_in_rounds: int = 0  # sum over rounds of num_accepted + 1 (less when a stop cut the round)
    num_proposed: int = 0
    num_verified: int = 0
    num_accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # rounds whose draft k was accepted
    verified_per_position: list[int] = field(default_factory=list)  # rounds whose draft k was verified
    elapsed_s: float = 0.0
    num_generated: int = 0
    # One (verified, accepted, committed) triple per round: the raw material for per-position
    # conditional acceptance, prefix survival and scheduler traces.
    round_log: list[tuple[int, int, int]] = field(default_factory=list)
    # The drafter's per-position confidences of each round's whole proposal (empty when it gives
    # none), aligned with round_log: the raw material for calibration and threshold sweeps.
    confidence_log: list[list[float]] = field(default_factory=list)

    @property
    def accept_length(self) -> float:
        return self.committed_in_rounds / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def record_round(self, num_verified: int, num_accepted: int, committed: int, num_proposed: int,
                     confidences: torch.Tensor | None = None) -> None:
        self.rounds += 1
        self.round_log.append((num_verified, num_accepted, committed))
        self.confidence_log.append(confidences.tolist() if confidences is not None else [])
        self.committed_in_rounds += committed
        self.num_proposed += num_proposed
        self.num_verified += num_verified
        self.num_accepted += num_accepted
        grow = num_verified - len(self.verified_per_position)
        if grow > 0:
            self.verified_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for k in range(num_verified):
            self.verified_per_position[k] += 1
        for k in range(num_accepted):
            self.accepted_per_position[k] += 1


@dataclass
class RequestOutput:
    request_id: str | int | None
    prompt_ids: list[int]
    token_ids: list[int]  # generated, including a final stop token if one ended the request
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    stats: RequestStats
    request: Request = field(repr=False)
    error: Exception | None = None  # what ended the request when finish_reason is "error"


@dataclass
class _Running:
    request: Request
    slot: int
    tokens: list[int]  # prompt + generated; the last is pending
    generator: torch.Generator
    stats: RequestStats
    started: float
    uid: int = 0  # admission counter: unique for the engine's lifetime
    finish_reason: str | None = None
    error: Exception | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt_ids)


@dataclass
class EngineTimings:
    """Wall-clock split of decode rounds (benchmarks read it; tests never assert on it)."""

    rounds: int = 0
    round_s: float = 0.0
    propose_s: float = 0.0
    target_forward_s: float = 0.0
    prefill_s: float = 0.0
    verified_tokens: int = 0  # tokens through verification forwards (pending + verified drafts)


class Engine:
    def __init__(self, target: LoadedModel, drafter: Drafter, config: EngineConfig):
        if config.max_seq_len > target.max_position_embeddings:
            raise DSparkError(
                f"max_seq_len {config.max_seq_len} exceeds the target's context "
                f"{target.max_position_embeddings}"
            )
        self.target = target
        self.drafter = drafter
        self.config = config
        self.cache = target.build_cache(config.max_batch_size, config.max_seq_len, headroom=config.block_size + 2)
        drafter.setup(config.max_batch_size, config.max_seq_len, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Running] = {}  # slot -> request
        self.timings = EngineTimings()
        # A drafting round's time for plan(): the median of the last DRAFT_TIMES measured rounds,
        # the first one left out (it pays one-time costs: allocations, kernel selection).
        self._draft_s: float | None = None
        self._draft_times: deque[float] = deque(maxlen=DRAFT_TIMES)
        self._draft_warm = False
        self._admitted = 0  # requests admitted so far (their uids)

    # ----------------------------------------------------------------------------------- requests
    def add_request(self, request: Request) -> None:
        if not request.prompt_ids:
            raise DSparkError("prompt is empty: give at least one token")
        limit = self.config.max_seq_len
        if len(request.prompt_ids) + 1 > limit:
            raise DSparkError(
                f"prompt has {len(request.prompt_ids)} tokens, but the context length is {limit} "
                "(prompt + at least one new token must fit); shorten the prompt or raise max_seq_len"
            )
        vocab = self.target.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise DSparkError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request: Request) -> RequestOutput | None:
        """Drop a waiting or running request (e.g. its client went away); its slot is freed at once.
        Returns its output so far (finish_reason "abort"), or None if it is not here."""
        for i, waiting in enumerate(self.waiting):
            if waiting is request:
                del self.waiting[i]
                return RequestOutput(request.request_id, list(request.prompt_ids), [], "abort", RequestStats(), request)
        for s in self.running.values():
            if s.request is request:
                s.finish_reason = "abort"
                return self._finish(s)
        return None

    def running_tokens(self) -> list[tuple[Request, list[int]]]:
        """Each running request with the tokens it has generated so far (for streaming)."""
        return [(s.request, s.tokens[len(s.request.prompt_ids):]) for s in self.running.values()]

    def generate(self, requests: Iterable[Request], policy: Policy = verify_all) -> list[RequestOutput]:
        """Run requests to completion; outputs in input order.

        A request that fails (finish_reason "error") raises its exception here, after the others of
        this call are aborted: callers that run a batch to completion (generate, eval, regeneration)
        must not take a cut-short output for a finished one. A server steps the engine itself and
        fails only that request."""
        requests = list(requests)
        for r in requests:
            self.add_request(r)
        done: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step(policy):
                done[id(out.request)] = out
                if out.error is not None:
                    for other in requests:
                        if id(other) not in done:
                            self.abort(other)
                    raise out.error
        return [done[id(r)] for r in requests]

    # -------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self, policy: Policy = verify_all) -> list[RequestOutput]:
        """Admit waiting requests (prefill), then run one draft-verify round. Returns finished requests."""
        finished = self._admit()
        if self.running:
            finished += self._round(policy)
        return finished

    def _admit(self) -> list[RequestOutput]:
        admitted: list[_Running] = []
        while self.waiting and len(self.running) < self.cache.num_slots:
            request = self.waiting.popleft()
            generator = make_generator(request.sampling.seed)  # before taking a slot: nothing to undo
            slot = self.cache.allocate()
            state = _Running(request, slot, list(request.prompt_ids), generator, RequestStats(), time.perf_counter(),
                             uid=self._admitted)
            self._admitted += 1
            self.running[slot] = state
            admitted.append(state)
        if not admitted:
            return []
        t0 = time.perf_counter()
        admitted.sort(key=lambda s: s.slot)
        lengths = [len(s.tokens) for s in admitted]
        width = max(lengths)
        ids = torch.zeros(len(admitted), width, dtype=torch.long)
        for row, s in enumerate(admitted):
            ids[row, : lengths[row]] = torch.tensor(s.tokens)
        positions = torch.arange(width).expand(len(admitted), width)
        out = self.target.model(
            ids, positions, torch.tensor([s.slot for s in admitted]), self.cache,
            num_new=torch.tensor(lengths), last_only=True, hidden_layers=self.drafter.feature_layers,
        )
        finished = []
        for row, s in enumerate(admitted):
            try:  # this request's own work: a failure ends it alone (module docstring)
                probs = logits_to_probs(out.logits[row, 0], s.request.sampling)
                first = int(sample_rows(probs[None], [s.request.sampling], [s.generator])[0])
                self.cache.set_length(s.slot, lengths[row])
                features = out.hidden_states[row, : lengths[row]] if out.hidden_states is not None else None
                self.drafter.begin(s.slot, list(s.request.prompt_ids), features)
                if self._commit(s, [first]):
                    finished.append(self._finish(s))
            except Exception as exc:  # noqa: BLE001
                finished.append(self._fail(s, exc))
        self.timings.prefill_s += time.perf_counter() - t0
        return finished

    def _round(self, policy: Policy) -> list[RequestOutput]:
        t_round = time.perf_counter()
        states = [self.running[slot] for slot in sorted(self.running)]
        requests = [
            DraftRequest(s.slot, s.tokens, self._max_drafts(s), s.request.sampling, s.generator, s.uid) for s in states
        ]
        able = [r.max_tokens > 0 for r in requests]
        plan = getattr(policy, "plan", None)
        if plan is not None:  # the policy may cap drafting before it happens (past information only)
            for r, cap in zip(requests, plan(requests, self._draft_s)):
                r.max_tokens = max(0, min(r.max_tokens, int(cap)))
        t0 = time.perf_counter()
        proposals = self.drafter.propose(requests)
        elapsed = time.perf_counter() - t0
        self.timings.propose_s += elapsed
        # The recent draft time of a round where every request that could draft did, for plan()
        # (which weighs drafting for all of them; a round drafting for a few would understate it).
        # A median, not a moving average: one slow round (a cold start, a context switch) made
        # drafting look 5x dearer for dozens of rounds, and a gate it closed measures nothing new.
        if any(able) and all(r.max_tokens > 0 for r, a in zip(requests, able) if a):
            if self._draft_warm:
                self._draft_times.append(elapsed)
                self._draft_s = statistics.median(self._draft_times)
            self._draft_warm = True
        lengths = list(policy(requests, proposals))
        for r, p, n in zip(requests, proposals, lengths):
            if not 0 <= n <= min(len(p), r.max_tokens):
                raise DSparkError(f"policy chose {n} tokens to verify for slot {r.slot}, valid: 0..{min(len(p), r.max_tokens)}")
        # One target forward over the ragged batch: row b = [pending token, first n_b drafts].
        width = 1 + max(lengths)
        ids = torch.zeros(len(states), width, dtype=torch.long)
        for row, (s, p, n) in enumerate(zip(states, proposals, lengths)):
            ids[row, 0] = s.tokens[-1]
            ids[row, 1 : 1 + n] = p.tokens[:n]
        starts = torch.tensor([len(s.tokens) - 1 for s in states])
        positions = starts[:, None] + torch.arange(width)
        t0 = time.perf_counter()
        out = self.target.model(
            ids, positions, torch.tensor([s.slot for s in states]), self.cache,
            num_new=torch.tensor([1 + n for n in lengths]), hidden_layers=self.drafter.feature_layers,
        )
        self.timings.target_forward_s += time.perf_counter() - t0
        self.timings.verified_tokens += len(states) + sum(lengths)
        drafts = [p.tokens[:n] for p, n in zip(proposals, lengths)]
        draft_probs = [p.draft_probs[:n] if p.draft_probs is not None else None for p, n in zip(proposals, lengths)]
        # Row by row (each with its own generator, so the draws are those of one batched call), so
        # that a row whose verification raises fails alone.
        verdicts: list[tuple[int, int] | Exception] = []
        survival: list[list[float]] = []
        for row, s in enumerate(states):
            try:
                one = verify_ragged(out.logits[row : row + 1], drafts[row : row + 1], draft_probs[row : row + 1],
                                    [s.request.sampling], [s.generator])
                verdicts.append((one.num_accepted[0], one.next_tokens[0]))
                survival.append(one.survival[0])
            except Exception as exc:  # noqa: BLE001
                verdicts.append(exc)
                survival.append([0.0] * lengths[row])
        observe = getattr(policy, "observe", None)
        if observe is not None:  # a failed row counts as nothing accepted (it leaves the batch now)
            observe(requests, lengths, [v[0] if isinstance(v, tuple) else 0 for v in verdicts], survival=survival)
        finished = []
        for row, (s, verdict) in enumerate(zip(states, verdicts)):
            if isinstance(verdict, Exception):
                finished.append(self._fail(s, verdict))
                continue
            try:
                a, next_token = verdict
                self.cache.set_length(s.slot, len(s.tokens) + a)  # pending token + accepted drafts
                new_tokens = drafts[row][:a].tolist() + [next_token]
                features = out.hidden_states[row, : a + 1] if out.hidden_states is not None else None
                self.drafter.commit(s.slot, a, features)
                before = s.num_generated
                stopped = self._commit(s, new_tokens)
                s.stats.record_round(lengths[row], a, s.num_generated - before, len(proposals[row]),
                                     proposals[row].confidences)
                if stopped:
                    finished.append(self._finish(s))
            except Exception as exc:  # noqa: BLE001
                finished.append(self._fail(s, exc))
        self.timings.rounds += 1
        self.timings.round_s += time.perf_counter() - t_round
        return finished

    def _max_drafts(self, s: _Running) -> int:
        """Drafts this round may verify: a round commits up to n + 1 tokens, all within limits."""
        left_tokens = s.request.stop.max_new_tokens - s.num_generated
        left_context = self.config.max_seq_len - len(s.tokens)
        return max(0, min(self.config.block_size, left_tokens - 1, left_context - 1))

    def _commit(self, s: _Running, new_tokens: list[int]) -> bool:
        """Append tokens, applying stop conditions; True when the request is finished."""
        stop = s.request.stop
        eos = () if stop.ignore_eos else (set(stop.stop_token_ids) | set(self.target.eos_token_ids))
        for i, token in enumerate(new_tokens):
            if token in eos:
                new_tokens = new_tokens[: i + 1]
                s.finish_reason = "stop"
                break
        s.tokens.extend(new_tokens)
        if s.finish_reason is None and s.request.stop_checker is not None:
            if s.request.stop_checker(s.tokens[len(s.request.prompt_ids) :]):
                s.finish_reason = "stop"
        if s.finish_reason is None and (
            s.num_generated >= stop.max_new_tokens or len(s.tokens) >= self.config.max_seq_len
        ):
            s.finish_reason = "length"
        return s.finish_reason is not None

    def _finish(self, s: _Running) -> RequestOutput:
        del self.running[s.slot]
        self.cache.free(s.slot)
        self.drafter.release(s.slot)
        return self._output(s)

    def _fail(self, s: _Running, exc: Exception) -> RequestOutput:
        """End one request whose own work raised (finish_reason "error"), freeing its slots. A
        drafter whose release raises too is only logged: its next `begin` starts that slot afresh."""
        s.finish_reason, s.error = "error", exc
        if self.running.get(s.slot) is s:  # _finish may have raised after letting go of it
            del self.running[s.slot]
            self.cache.free(s.slot)
        try:
            self.drafter.release(s.slot)
        except Exception:  # noqa: BLE001
            log.exception("releasing drafter slot %d of a failed request failed", s.slot)
        return self._output(s)

    def _output(self, s: _Running) -> RequestOutput:
        s.stats.elapsed_s = time.perf_counter() - s.started
        s.stats.num_generated = s.num_generated
        return RequestOutput(
            s.request.request_id, list(s.request.prompt_ids), s.tokens[len(s.request.prompt_ids) :],
            s.finish_reason, s.stats, s.request, s.error,
        )
