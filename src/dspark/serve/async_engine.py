"""AsyncEngine: one background thread steps the Engine while there is work; asyncio callers submit
requests and read each request's tokens as rounds commit them (continuous batching: requests join
and leave between rounds).

Threading model
- The engine, its drafter and the policy are touched by the decode thread only.
- Callers (usually the event loop) hand submissions and cancellations to that thread through an
  inbox guarded by a condition variable; the thread sleeps on it while there is no work.
- The thread hands results back with `loop.call_soon_threadsafe` into one asyncio.Queue per request.
- Other work on the engine's model or policy (timing the target's forwards for a cost table,
  switching the policy) goes through `call_between_steps`: the decode thread runs it between two
  steps, so it never overlaps a step and the threading model above stays true.

Bounds: at most `max_batch_size` requests decode at once (the engine's slots) and at most
`max_queue` more wait; a submission beyond that is refused at once with ServeError(503).

Failure isolation (one bad request must not break the loop or the others)
- `add_request` raising (e.g. a token id outside the vocabulary): that request alone gets the error
  (400 for a DSparkError, 500 otherwise).
- A failure in one request's own work (its sampling, verification, stop checker, drafter slot): the
  engine ends that request alone with finish_reason "error" (see engine.py); it gets a 500 error
  and the rest of the batch decodes on, unchanged.
- `Engine.step` raising (batched work: a forward, the drafter's propose, the policy): no running
  request can be trusted to have consistent caches, so every *running* request is aborted and gets
  a 500 error. Reset state: `Engine.abort` frees each one's KV-cache slot and releases its drafter
  slot (a slot is rebuilt by prefill when the next request takes it). Kept: waiting requests (the
  failed step did not touch them), the policy's own state (e.g. an acceptance estimate) and
  `engine.timings`.

Shutdown: `drain(timeout)` stops admitting at once and lets requests in flight finish for up to
`timeout` seconds; `shutdown()` then ends whatever is left with ServeError(503) (a stream's final
error event, or a 503 response).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from dspark.engine.engine import Engine, Policy, Request, RequestOutput, verify_all
from dspark.errors import DSparkError

log = logging.getLogger(__name__)

_ADMITTED = object()  # first item on a request's queue once the engine has accepted it
T = TypeVar("T")


class ServeError(Exception):
    """A request that could not be served: HTTP status, OpenAI error type, message for the client."""

    def __init__(
        self, status: int, message: str, kind: str = "server_error", code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Increment:
    """Tokens a request committed since its previous increment; the last one carries the finish."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last increment (an error raises)
    output: RequestOutput | None = None  # on the last increment (None if aborted before admission)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepReport:
    """What one engine step did; observers (metrics) get one per step, on the decode thread."""

    ran_round: bool  # a draft-verify round ran (a step may only prefill)
    verified_tokens: int  # tokens through the round's verify forward (pending + verified drafts)
    budget: float | None  # the policy's `last_budget` when it exposes one and a round ran
    new_tokens: int  # tokens committed this step, first tokens from prefill included
    finished: list[RequestOutput]
    num_running: int
    num_waiting: int
    step_s: float


def _shutting_down() -> ServeError:
    return ServeError(503, "the server shut down before this request finished", "service_unavailable_error",
                      "shutting_down")


@dataclass(eq=False)
class _Handle:
    original: Request  # what the caller submitted
    request: Request  # the copy the engine holds (its own object: identity names the submission)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: int = 0  # generated tokens already pushed
    added: bool = False  # engine.add_request succeeded
    done: bool = False  # its last item is pushed


class RequestStream:
    """Async iterator over one request's increments (from `AsyncEngine.submit`).

    The last increment has `finish_reason` set; a failed request raises ServeError instead. If the
    task reading it is cancelled while waiting (e.g. the HTTP client went away) the request is
    cancelled in the engine; a caller that merely stops iterating should call `cancel()`.
    """

    def __init__(self, owner: AsyncEngine, handle: _Handle):
        self._owner = owner
        self._handle = handle
        self._finished = False

    @property
    def request(self) -> Request:
        return self._handle.original

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Increment:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._handle.queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finished:
            self._finished = True
        return item

    def cancel(self) -> None:
        """Abort the request in the engine (frees its slot); a no-op once it has finished."""
        if not self._finished:
            self._owner.cancel(self._handle.request)


class AsyncEngine:
    """Owns an Engine and a verification policy; one daemon thread runs `engine.step(policy)`."""

    def __init__(self, engine: Engine, policy: Policy = verify_all, max_queue: int = 64):
        if max_queue < 0:
            raise DSparkError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.policy = policy
        self.max_queue = max_queue
        self.num_failed_steps = 0  # engine steps that raised (their running requests failed)
        self.num_aborted = 0  # requests cancelled while the engine held them
        self._cond = threading.Condition()  # guards everything below; RLock inside, so re-entrant
        self._inbox: list[_Handle] = []
        self._cancels: list[_Handle] = []
        self._tasks: list[tuple[Callable[[], object], Future]] = []  # call_between_steps, in order
        self._handles: dict[int, _Handle] = {}  # id(engine-side request) -> handle, submit to finish
        self._observers: list[Callable[[StepReport], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting = True  # False once draining: new submissions get a 503
        self._num_running = 0  # written by the decode thread after each step

    # ------------------------------------------------------------------------------- public API
    @property
    def capacity(self) -> int:
        """Requests in flight at most: the engine's slots plus the waiting queue."""
        return self.engine.config.max_batch_size + self.max_queue

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return max(0, len(self._handles) - self._num_running)

    @property
    def is_alive(self) -> bool:
        """False once shut down or if the decode thread died (a bug: the loop catches everything)."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def is_admitting(self) -> bool:
        return self._admitting and self.is_alive

    def add_observer(self, observer: Callable[[StepReport], None]) -> None:
        """Call `observer(report)` on the decode thread after every step (keep it cheap)."""
        self._observers.append(observer)

    async def submit(self, request: Request) -> RequestStream:
        """Queue a request; returns once the engine has accepted it (ServeError otherwise).

        Raises ServeError(503) at once when `capacity` requests are already in flight.
        """
        loop = asyncio.get_running_loop()
        engine_request = dataclasses.replace(request)
        handle = _Handle(request, engine_request, loop, asyncio.Queue())
        with self._cond:
            if self._stopping or not self._admitting:
                raise ServeError(503, "the server is shutting down", "service_unavailable_error", "shutting_down")
            if self._thread is not None and not self._thread.is_alive():
                raise ServeError(503, "the decode loop has stopped; restart the server", "service_unavailable_error")
            if len(self._handles) >= self.capacity:
                running = self._num_running
                raise ServeError(
                    503,
                    f"server is at capacity: {running} requests decoding and {len(self._handles) - running} "
                    f"waiting (max_batch_size={self.engine.config.max_batch_size}, max_queue={self.max_queue}); "
                    "retry later",
                    "service_unavailable_error", "queue_full",
                )
            self._handles[id(engine_request)] = handle
            self._inbox.append(handle)
            self._start_thread()
            self._cond.notify_all()
        stream = RequestStream(self, handle)
        # Whoever drops the stream unfinished (a response body never started, a handler that
        # failed) abandons the request: cancel it then, so it does not hold a slot to the end.
        weakref.finalize(stream, self.cancel, engine_request).atexit = False
        try:
            item = await handle.queue.get()
        except asyncio.CancelledError:
            self.cancel(engine_request)
            raise
        if isinstance(item, BaseException):
            raise item
        if item is not _ADMITTED:  # cancelled by someone else before admission: the stream ends at once
            handle.queue.put_nowait(item)
        return stream

    def cancel(self, request: Request) -> None:
        """Abort a submitted request (thread-safe): the object given to `submit` (or a stream's
        engine-side copy). It ends with finish_reason "abort"; a no-op once it has finished."""
        with self._cond:
            # identity, not ==: two submissions of equal requests are still two requests
            handle = next((h for h in self._handles.values() if request is h.request or request is h.original), None)
            if handle is None or handle.done:
                return
            if handle in self._inbox:  # not yet handed to the engine
                self._inbox.remove(handle)
                self._finish(handle, Increment([], "abort"))
            elif handle not in self._cancels:
                self._cancels.append(handle)
                self._cond.notify_all()

    def call_between_steps(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the decode thread between two engine steps and return its result (or raise
        its exception). Blocks the caller: never call it from the event loop, nor from the decode
        thread itself (it would wait for itself). Tasks run one per loop turn, alternating with
        steps, so a long series of them (a cost profile) slows decoding without stopping it.
        Raises ServeError(503) once the engine shuts down."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if self._thread is not None and not self._thread.is_alive():
                raise ServeError(503, "the decode loop has stopped; restart the server", "service_unavailable_error")
            self._tasks.append((fn, future))
            self._start_thread()
            self._cond.notify_all()
        return future.result()

    def drain(self, timeout: float) -> threading.Thread:
        """Begin a bounded graceful shutdown: refuse new submissions (503) at once, let requests in
        flight finish for up to `timeout` seconds, then `shutdown()` (the rest get ServeError(503)).
        Returns at once; the returned thread does the waiting."""

        def wait_then_stop() -> None:
            deadline = time.monotonic() + max(0.0, timeout)
            with self._cond:
                while self._handles and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._handles:
                    log.warning("shutdown timeout of %gs reached: ending %d unfinished requests",
                                timeout, len(self._handles))
            self.shutdown()

        with self._cond:
            self._admitting = False
        thread = threading.Thread(target=wait_then_stop, name="dspark-drain", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the decode thread after its current step; unfinished requests get ServeError(503)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            if thread is not threading.current_thread():
                thread.join(timeout)
        else:
            self._drain(_shutting_down())

    # --------------------------------------------------------------------------- decode thread
    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dspark-decode", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._tasks or self._stopping
                           or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                task = self._tasks.pop(0) if self._tasks else None
            try:
                try:
                    self._apply_cancels(cancels)
                finally:  # a failing cancel must not swallow the submissions that came with it
                    self._apply_adds(inbox)
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # a bug here, not in a request: log it and keep serving
                log.exception("dspark decode loop error")
            if task is not None:
                self._run_task(*task)
            with self._cond:
                self._num_running = len(self.engine.running)
        self._drain(_shutting_down())

    @staticmethod
    def _run_task(fn: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _apply_cancels(self, cancels: list[_Handle]) -> None:
        for handle in cancels:
            if handle.done:
                continue
            try:
                out = self.engine.abort(handle.request)
            except Exception:  # e.g. a drafter's release() failing: the request still ends here
                log.exception("dspark: aborting a request failed")
                out = None
            self.num_aborted += out is not None
            tokens = out.token_ids[handle.sent :] if out is not None else []
            self._finish(handle, Increment(tokens, "abort", out))

    def _apply_adds(self, inbox: list[_Handle]) -> None:
        for handle in inbox:
            try:
                self.engine.add_request(handle.request)
            except Exception as exc:  # goes back to this request only
                if isinstance(exc, DSparkError):
                    self._finish(handle, ServeError(400, str(exc), "invalid_request_error"))
                else:
                    log.exception("add_request failed")
                    self._finish(handle, ServeError(500, f"could not start this request: {type(exc).__name__}: {exc}"))
                continue
            handle.added = True
            self._push(handle, _ADMITTED)

    def _step(self) -> None:
        timings = self.engine.timings
        rounds, verified = timings.rounds, timings.verified_tokens
        t0 = time.perf_counter()
        try:
            finished = self.engine.step(self.policy)
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the loop
            self._recover(exc)
            return
        step_s = time.perf_counter() - t0
        new_tokens = 0
        for request, tokens in self.engine.running_tokens():
            handle = self._handles.get(id(request))
            if handle is not None and len(tokens) > handle.sent:
                new_tokens += len(tokens) - handle.sent
                self._push(handle, Increment(tokens[handle.sent :]))
                handle.sent = len(tokens)
        for out in finished:
            handle = self._handles.get(id(out.request))
            if handle is None:
                continue
            new_tokens += len(out.token_ids) - handle.sent
            if out.finish_reason == "error":
                err = out.error
                log.error("request %s failed alone; the others go on", out.request_id, exc_info=err)
                self._finish(handle, ServeError(
                    500, f"this request failed in the engine ({type(err).__name__}: {err}); the server keeps serving"))
            else:
                self._finish(handle, Increment(out.token_ids[handle.sent :], out.finish_reason, out))
        ran = timings.rounds > rounds
        budget = getattr(self.policy, "last_budget", None) if ran else None
        report = StepReport(
            ran, timings.verified_tokens - verified, budget, new_tokens, finished,
            len(self.engine.running), len(self.engine.waiting), step_s,
        )
        for observer in self._observers:
            try:
                observer(report)
            except Exception:  # metrics must never stop decoding
                log.exception("step observer failed")

    def _recover(self, exc: Exception) -> None:
        """Abort every running request after a failed step (see the module docstring)."""
        self.num_failed_steps += 1
        log.error("engine step failed; aborting %d running requests", len(self.engine.running), exc_info=exc)
        for request, _ in self.engine.running_tokens():
            try:
                self.engine.abort(request)
            except Exception:  # the drafter's release failed too: drop the slot by hand
                log.exception("abort after a failed step failed")
                self._evict(request)
        waiting = {id(r) for r in self.engine.waiting}
        message = (f"the engine failed while decoding this request ({type(exc).__name__}: {exc}); "
                   "it was aborted, and the server keeps serving")
        for handle in list(self._handles.values()):
            if handle.added and not handle.done and id(handle.request) not in waiting:
                self._finish(handle, ServeError(500, message))

    def _evict(self, request: Request) -> None:
        for slot, state in list(self.engine.running.items()):
            if state.request is request:
                del self.engine.running[slot]
                try:
                    self.engine.cache.free(slot)
                except Exception:  # best effort; the slot stays unusable
                    log.exception("could not free cache slot %d", slot)

    def _drain(self, error: ServeError) -> None:
        """After the loop stops: abort what the engine holds and fail every open request."""
        for request, _ in self.engine.running_tokens():
            try:
                self.engine.abort(request)
            except Exception:  # noqa: BLE001
                self._evict(request)
        self.engine.waiting.clear()
        with self._cond:
            handles = list(self._handles.values())
            self._inbox.clear()
            self._cancels.clear()
            tasks, self._tasks = self._tasks, []
        for handle in handles:
            self._finish(handle, error)
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    # ------------------------------------------------------------------------------ hand-back
    def _finish(self, handle: _Handle, item: Increment | ServeError) -> None:
        with self._cond:
            if handle.done:
                return
            handle.done = True
            self._handles.pop(id(handle.request), None)
            self._cond.notify_all()  # a drain may be waiting for the last one
        self._push(handle, item)

    def _push(self, handle: _Handle, item: object) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody listens any more
            if not handle.done:
                self.cancel(handle.original)
