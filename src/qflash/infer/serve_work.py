"""The one thread that runs the model for `qflash serve`, fed by a bounded first-come-first-served queue.

Why one worker thread and not a lock taken by each request thread: the request threads never touch the
model (nor the tokenizer, which is not thread-safe), and the worker never touches a socket. Generated
text goes into a bounded buffer per request that the request's own thread writes out; a client that
stops reading fills only its own buffer, and a full buffer cancels that request, not the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
import uuid
from dataclasses import dataclass, field, replace

from qflash.infer.engine import Cancelled, Completion, ContextOverflow, Engine
from qflash.infer.options import MessageError
from qflash.infer.serve_api import ApiError, ChatRequest, internal_error, printable, shutting_down

log = logging.getLogger("qflash.infer.serve")

STREAM_BUFFER = 512  # text pieces held for a streaming client; full = the client is not reading


@dataclass
class Job:
    """One chat request on its way through the worker. Written by the worker, read by the request's thread."""

    request: ChatRequest
    pieces: queue.Queue = field(default_factory=lambda: queue.Queue(STREAM_BUFFER))
    """Streamed text, in order; bounded."""
    started: threading.Event = field(default_factory=threading.Event)
    """Set once the prompt is accepted and generation begins (a stream's headers can go out)."""
    done: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None
    error: ApiError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""

    def stop(self, reason: str) -> None:
        """Cancel (first reason wins): a queued job is skipped, a running one ends within a token."""
        if not self.cancel.is_set():
            self.cancel_reason = reason
            self.cancel.set()


@dataclass
class WorkStats:
    completed: int = 0
    cancelled_queued: int = 0
    """Cancelled before generation began (client left, or shutdown): no token generated for them."""
    cancelled_running: int = 0
    refused: int = 0
    """Answered 429 because the queue was full."""
    tokens: int = 0
    """Tokens generated, those of cancelled replies included."""
    wasted_tokens: int = 0
    """Of these, tokens of replies that were cancelled (generated for nobody)."""


class Scheduler:
    """A bounded FIFO queue of jobs and the worker thread that runs them one at a time."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue(max_queue)
        self.stats = WorkStats()
        self.running: Job | None = None
        self.stopping = threading.Event()
        self._refused_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="qflash-serve-model", daemon=False)
        self.thread.start()

    def submit(self, request: ChatRequest) -> Job:
        """The queued job, or ApiError 429 (queue full) / 503 (stopping)."""
        if self.stopping.is_set():
            raise shutting_down()
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            with self._refused_lock:
                self.stats.refused += 1
            raise ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting for the "
                           "model (qflash serve --max-queue); retry after a few seconds", "rate_limit_exceeded",
                           type_="requests", headers={"Retry-After": "2"}) from None
        return job

    def waiting(self) -> int:
        return self.jobs.qsize()

    def stop(self, timeout: float) -> bool:
        """Cancel every queued and running job, end the worker; whether it ended within timeout."""
        self.stopping.set()
        with self.jobs.mutex:
            pending = [j for j in self.jobs.queue if j is not None]
        for job in pending + ([self.running] if self.running else []):
            job.stop("shutting_down")
        try:
            self.jobs.put(None, timeout=timeout)  # the worker drains cancelled jobs at once
        except queue.Full:
            return False
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # --------------------------------------------------------------------------------------------
    # The worker thread

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.running = job
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - a bug in one request must not end the worker
                ref = f"error-{uuid.uuid4().hex[:8]}"
                log.error("%s: internal error while generating:\n%s", ref, printable(traceback.format_exc(), 20000))
                job.error = internal_error(ref)
            finally:
                self.running = None
                job.done.set()

    def _run(self, job: Job) -> None:
        if job.cancel.is_set() or self.stopping.is_set():
            self.stats.cancelled_queued += 1
            job.error = shutting_down() if self.stopping.is_set() else _cancelled(job)
            return
        req = job.request
        try:
            prompt = self.engine.prompt_ids(req.messages)
        except MessageError as e:
            job.error = ApiError(400, str(e), "invalid_messages", "messages")
            return
        max_new = self._reply_budget(job, len(prompt))
        if max_new is None:
            return
        job.started.set()
        on_text = (lambda text: self._put(job, text)) if req.stream else None
        try:
            c = self.engine.complete(prompt, replace(req.opts, max_new_tokens=max_new), on_text=on_text,
                                     cancel=job.cancel)
        except Cancelled as e:
            self.stats.cancelled_running += 1
            self.stats.tokens += e.generated
            self.stats.wasted_tokens += e.generated
            job.error = shutting_down() if job.cancel_reason == "shutting_down" else _cancelled(job)
            return
        except ContextOverflow as e:
            job.error = ApiError(400, str(e), "context_length_exceeded", "messages")
            return
        self.stats.completed += 1
        self.stats.tokens += c.completion_tokens
        job.completion = c

    def _reply_budget(self, job: Job, prompt_len: int) -> int | None:
        """The reply's token budget, or None with job.error set (OpenAI refuses what does not fit)."""
        window, req = self.engine.context_window, job.request
        room = window - prompt_len
        if room < 1 or (req.max_tokens_given and req.opts.max_new_tokens > room):
            asked = f" + {req.opts.max_new_tokens} for the reply (max_tokens)" if req.max_tokens_given else ""
            job.error = ApiError(400, f"this model's context window is {window} tokens; the messages are "
                                 f"{prompt_len} tokens{asked}: shorten the messages or ask for fewer tokens",
                                 "context_length_exceeded", "messages")
            return None
        return min(req.opts.max_new_tokens, room)

    def _put(self, job: Job, text: str) -> None:
        """A streamed piece into the job's buffer; a full buffer means the client stopped reading."""
        if job.cancel.is_set():
            return
        try:
            job.pieces.put_nowait(text)
        except queue.Full:
            log.warning("a streaming client stopped reading (%d pieces unread): its request is cancelled",
                        STREAM_BUFFER)
            job.stop("client_too_slow")


def _cancelled(job: Job) -> ApiError:
    # Nobody reads this when the client left; it is what a stream's log line and the counters show.
    return ApiError(499 if job.cancel_reason == "client_closed" else 408,
                    f"request cancelled: {job.cancel_reason or 'cancelled'}", job.cancel_reason or "cancelled")
