"""`qflash serve`: an OpenAI-compatible HTTP server for one model (chat completions, streaming, models).

Why the standard library's ThreadingHTTPServer and not an async framework: one model answers one
request at a time, so concurrency buys nothing beyond accepting connections while a reply is generated;
the protocol needed is small (JSON in and out, server-sent events over chunked transfer encoding); and it
adds no dependency. What keeps it robust under load and against hostile clients:

- a thread per connection, but at most --max-connections of them (lowered to fit the file-descriptor
  limit); at the limit the oldest connection without a request in progress is closed for the new one;
- every socket read and write has --timeout, the body a deadline, the JSON a nesting limit;
- request threads never touch the model: one worker thread (serve_work.py) takes requests from a bounded
  FIFO queue (full: 429 + Retry-After) and hands text back through a bounded buffer per request, so a
  client that stops reading slows only itself (a full buffer cancels its request);
- a client that leaves is noticed while its request waits or runs, and the work stops;
- --max-new-tokens is the ceiling of max_tokens: more is refused with 400 naming the limit (OpenAI's
  answer to a max_tokens over the model's limit), and a request that names none gets the ceiling;
- without an API key only this machine may talk to it: Host and Origin must be loopback names, and a
  POST must be application/json (what a web page cannot send cross-site without asking first);
- errors are OpenAI-shaped JSON (serve_api.py has the status codes); a bug is a 500 whose details go to
  the log, never to the client; what the log shows of a request is escaped, so it cannot drive the
  operator's terminal.

Routes: GET /health (counters), GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions; HEAD and
OPTIONS for each (no CORS headers: browsers keep cross-site pages out).

Stopping (Ctrl-C, SIGTERM): new connections are no longer accepted, a reply being generated is cut
within a token and answered 503 server_shutting_down, queued requests too, idle keep-alive connections
are closed, and every thread is joined before the summary is printed. No thread that ran the model
outlives the server: a daemon thread still alive at interpreter exit could make the exit abort inside
torch's C++ teardown ("terminate called without an active exception", exit status -6).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from qflash.errors import ConfigError
from qflash.infer.engine import Engine
from qflash.infer.options import SamplingOptions
from qflash.infer.serve_api import (
    ApiError, ServeLimits, check_json_content_type, check_origin, encode_json, internal_error, is_loopback,
    parse_chat_request, printable,
)
from qflash.infer.serve_work import Job, Scheduler

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes; a chat request is text, 4 MiB is far beyond any context window
API_KEY_ENV = "QFLASH_API_KEY"
SHUTDOWN_GRACE = 10.0  # seconds a request thread gets to finish after stop, before its socket is cut
POLL = 0.05  # seconds between checks that a waiting client is still there
RESERVED_FDS = 64  # descriptors kept for the model's files, logs and the listening socket
REFUSED = encode_json(ApiError(503, "the server has all the connections it can hold; retry in a moment",
                               "server_overloaded", type_="server_error").body())
REFUSED_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(REFUSED)).encode() + b"\r\n\r\n" + REFUSED)

__all__ = ["ApiError", "ServeLimits", "ServeState", "check_bind", "is_loopback", "make_server", "resolve_api_key",
           "serve"]


def resolve_api_key(given: str | None) -> str | None:
    """--api-key, else $QFLASH_API_KEY; an empty value is no key."""
    return given or os.environ.get(API_KEY_ENV) or None


def check_bind(host: str, api_key: str | None) -> None:
    """Serving beyond this machine without a key would hand the model to anyone who can reach the port."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"--host {host}: serving beyond this machine needs an API key; pass --api-key KEY or set "
            f"{API_KEY_ENV} (clients then send 'Authorization: Bearer KEY'), or bind to 127.0.0.1"
        )


def connection_limit(requested: int) -> int:
    """requested, lowered so that open connections (2 descriptors each at worst: one closing while its
    replacement opens) cannot exhaust the process's descriptor limit."""
    try:
        import resource
    except ImportError:  # not on Unix
        return requested
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return requested
    fits = max(4, (soft - RESERVED_FDS) // 2)
    if fits < requested:
        log.warning("--max-connections %d lowered to %d to fit the open-file limit of %d (ulimit -n)",
                    requested, fits, soft)
    return min(requested, fits)


@dataclass
class ServeState:
    engine: Engine
    model_id: str
    defaults: SamplingOptions
    """Sampling defaults; defaults.max_new_tokens is the ceiling of a request's max_tokens."""
    api_key: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    created: int = field(default_factory=lambda: int(time.time()))
    requests: int = 0
    errors: int = 0
    counter_lock: threading.Lock = field(default_factory=threading.Lock)
    scheduler: Scheduler | None = None
    """Started by make_server."""

    @property
    def stopping(self) -> threading.Event:
        return self.scheduler.stopping

    @property
    def tokens(self) -> int:
        return self.scheduler.stats.tokens

    def count(self, status: int) -> None:
        with self.counter_lock:
            self.requests += 1
            self.errors += status >= 400


class ConnectionTable:
    """Open connections, oldest first, and whether each has a request in progress."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._busy: dict[socket.socket, bool] = {}  # insertion order = age
        self._closing: set[socket.socket] = set()
        self.accepted = self.refused = self.closed_idle = 0

    def admit(self, conn: socket.socket) -> bool:
        """Whether conn may stay; at the limit the oldest idle connection is closed to make room."""
        with self._lock:
            if len(self._busy) - len(self._closing) >= self.limit:
                idle = next((c for c, busy in self._busy.items() if not busy and c not in self._closing), None)
                if idle is None or len(self._busy) >= 2 * self.limit:
                    self.refused += 1
                    return False
                self._closing.add(idle)
                self.closed_idle += 1
                _shutdown(idle, socket.SHUT_RDWR)  # its thread sees end-of-stream and ends
            self._busy[conn] = False
            self.accepted += 1
            return True

    def mark(self, conn: socket.socket, busy: bool) -> None:
        with self._lock:
            if conn in self._busy:
                self._busy[conn] = busy

    def remove(self, conn: socket.socket) -> None:
        with self._lock:
            self._busy.pop(conn, None)
            self._closing.discard(conn)

    def open(self) -> list[socket.socket]:
        with self._lock:
            return list(self._busy)


def _shutdown(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:
        pass  # already closed by the client


class QflashServer(ThreadingHTTPServer):
    daemon_threads = False  # joined in stop(); see the module docstring
    block_on_close = True
    request_queue_size = 128  # the listen backlog: a burst of connections waits for accept, not for SYN retries
    state: ServeState
    table: ConnectionTable

    def process_request(self, request, client_address) -> None:
        if not self.table.admit(request):
            # Answered here, in the accepting thread, without blocking it: a full send buffer drops the reply.
            request.setblocking(False)
            try:
                request.send(REFUSED_RESPONSE)
            except OSError:
                pass
            socketserver.TCPServer.shutdown_request(self, request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        self.table.remove(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """An exception that escaped a handler: one escaped line in the log, not a traceback on stderr."""
        log.warning("connection from %s ended by an error: %s", client_address[0],
                    printable(traceback.format_exc(limit=-1).strip().splitlines()[-1]))

    def _cut(self, how: int) -> None:
        for conn in self.table.open():
            _shutdown(conn, how)

    def stop(self, grace: float = SHUTDOWN_GRACE) -> int:
        """Cancel generation, end every connection, join every thread; how many threads are still running."""
        worker_ended = self.state.scheduler.stop(grace)  # running and queued requests end with 503
        self._cut(socket.SHUT_RD)  # idle keep-alive readers see end-of-stream; replies can still be written
        threads = list(vars(self).get("_threads", []))  # none before the first connection
        deadline = time.monotonic() + grace
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            self._cut(socket.SHUT_RDWR)  # a client that does not read its reply: its write fails now
            for t in threads:
                t.join(5.0)
        # The listening socket only: ThreadingMixIn.server_close would join again, without a time limit.
        socketserver.TCPServer.server_close(self)
        return sum(t.is_alive() for t in threads) + (not worker_ended)


class _ClientGone(Exception):
    """The client closed its connection while its request waited or ran."""


class _Reported(Exception):
    """An error already sent to the client inside a stream."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: QflashServer
    server_version = "qflash"

    # --------------------------------------------------------------------------------------------
    # Connection plumbing

    def setup(self) -> None:
        self.timeout = self.server.state.limits.timeout  # every read and write of this connection
        super().setup()
        self._pipelined = False
        self._head_only = False

    def handle_one_request(self) -> None:
        self.server.table.mark(self.connection, busy=False)  # waiting for a request: may be closed for another
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.table.mark(self.connection, busy=True)
        return ok

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request is written by _handle, with the outcome

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (a malformed request line, headers too long, unknown method), as JSON."""
        reason = message or self.responses.get(code, ("error",))[0]
        log.info("%s %s %d %s", time.strftime("%H:%M:%S"), self.client_address[0], code,
                 printable(f"{reason}: {getattr(self, 'raw_requestline', b'')[:200]!r}"))
        self.server.state.count(code)
        err = ApiError(code, reason, {501: "method_not_allowed"}.get(code, "invalid_request"))
        self._send_json(code, err.body(), close=True)

    def _send_json(self, status: int, payload: dict, close: bool = False, headers: dict[str, str] | None = None) -> None:
        data = encode_json(payload)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not self._head_only:
            self.wfile.write(data)
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else encode_json(payload).decode("utf-8")
        self._chunk(f"data: {text}\n\n".encode("utf-8"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length header (chunked uploads are not accepted)",
                           "length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length header required", "length_required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length: not a number: {length[:40]!r}", "invalid_header") from None
        if n < 0:
            raise ApiError(400, f"Content-Length: negative: {n}", "invalid_header")
        if n > MAX_BODY:
            raise ApiError(413, f"request body of {n} bytes is over the limit of {MAX_BODY}", "body_too_large")
        return self._read_exactly(n)

    def _read_exactly(self, n: int) -> bytes:
        """n body bytes within the timeout, as a whole (a body trickled in byte by byte is cut off too)."""
        limit = self.server.state.limits.timeout
        deadline, parts, left = time.monotonic() + limit, [], n
        try:
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError
                part = self.rfile.read1(min(left, 1 << 16))
                if not part:
                    raise ApiError(400, f"the connection ended {left} bytes before the end of the body", "incomplete_body")
                parts.append(part)
                left -= len(part)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {limit:g}s", "request_timeout") from None
        return b"".join(parts)

    def _check_key(self) -> None:
        key = self.server.state.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                           type_="authentication_error")

    def _client_gone(self) -> bool:
        """Whether the client closed its end (checked while its request waits or runs)."""
        if self._pipelined:
            return False  # it sent its next request already: it is there
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            data = self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True
        self._pipelined = bool(data)
        return not data

    def _wait_for(self, job: Job, event: threading.Event) -> None:
        """Until event (or the job's end); the client leaving cancels the job."""
        while not event.wait(POLL):
            if job.done.is_set():
                return
            if self._client_gone():
                job.stop("client_closed")
                raise _ClientGone()

    # --------------------------------------------------------------------------------------------
    # Dispatch

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._head_only = True  # a GET's status and headers, no body
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._handle("OPTIONS")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def _routes(self, path: str) -> dict[tuple[str, str], Callable[[], None]]:
        routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                  ("POST", "/v1/chat/completions"): self._chat}
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            routes[("GET", path)] = lambda: self._model(path[len("/v1/models/"):])
        return routes

    def _route(self, method: str, path: str) -> Callable[[], None]:
        """The handler for method + path; ApiError 404 (no such path) or 405 (path exists, other method)."""
        routes = self._routes(path)
        allowed = sorted(m for m, p in routes if p == path)
        allowed += ["HEAD"] if "GET" in allowed else []
        if method == "OPTIONS" and allowed:
            return lambda: self._options(allowed + ["OPTIONS"])
        if (method if method != "HEAD" else "GET", path) in routes:
            return routes[(method if method != "HEAD" else "GET", path)]
        if allowed:
            raise ApiError(405, f"{method} {path}: method not allowed (use {', '.join(allowed)})",
                           "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, f"{method} {path}: no such route (POST /v1/chat/completions, GET /v1/models, "
                       "GET /health)", "not_found")

    def _handle(self, method: str) -> None:
        t0 = time.perf_counter()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._outcome = {"status": 500, "note": ""}
        self._headers_sent = False
        try:
            if not self.server.state.api_key:
                check_origin(self.headers.get("Host"), self.headers.get("Origin"))
            fn = self._route(method, path)
            if path != "/health" and method != "OPTIONS":
                self._check_key()
            fn()
        except ApiError as e:
            self._outcome.update(status=e.status, note=e.code)
            if not self._headers_sent:
                # The body may be unread (a 401/404/413 before reading it): close, so no leftover bytes
                # are taken for the next request on this connection.
                self._send_json(e.status, e.body(), close=True, headers=e.headers)
        except _ClientGone:
            self._outcome.update(status=499, note="client closed the connection (its request was cancelled)")
            self.close_connection = True
        except _Reported:
            pass  # sent inside the stream already
        except OSError as e:  # the client left, a write timed out, or the socket was cut while stopping
            self._outcome.update(status=499, note=f"client closed the connection or stopped reading ({type(e).__name__})")
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the server
            self._internal_error(method)
        finally:
            self._log_outcome(method, t0)

    def _internal_error(self, method: str) -> None:
        ref = f"error-{uuid.uuid4().hex[:8]}"
        log.error("%s: internal error on %s %s:\n%s", ref, method, printable(self.path, 200),
                  printable(traceback.format_exc(), 20000))
        self._outcome.update(status=500, note=ref)
        self.close_connection = True
        if not self._headers_sent:
            self._send_json(500, internal_error(ref).body(), close=True)

    def _log_outcome(self, method: str, t0: float) -> None:
        o = self._outcome
        self.server.state.count(o["status"])
        log.info("%s %s \"%s %s\" %d %.2fs%s", time.strftime("%H:%M:%S"), self.client_address[0], method,
                 printable(self.path, 200), o["status"], time.perf_counter() - t0,
                 f" {printable(o['note'], 300)}" if o["note"] else "")

    # --------------------------------------------------------------------------------------------
    # Routes

    def _options(self, allowed: list[str]) -> None:
        # No Access-Control-* headers: a browser's preflight from another site's page fails.
        self._outcome["status"] = 204
        self.send_response(204)
        self.send_header("Allow", ", ".join(allowed))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _health(self) -> None:
        s = self.server.state
        w, t = s.scheduler.stats, self.server.table
        self._outcome["status"] = 200
        self._send_json(200, {
            "status": "stopping" if s.stopping.is_set() else "ok", "model": s.model_id,
            "queue": {"running": int(s.scheduler.running is not None), "waiting": s.scheduler.waiting(),
                      "limit": s.scheduler.max_queue},
            "connections": {"open": len(t.open()), "limit": t.limit, "accepted": t.accepted, "refused": t.refused,
                            "closed_idle": t.closed_idle},
            "requests": {"completed": w.completed, "refused": w.refused, "cancelled_queued": w.cancelled_queued,
                         "cancelled_running": w.cancelled_running},
            "tokens": {"generated": w.tokens, "for_cancelled": w.wasted_tokens},
        })

    def _model_card(self) -> dict:
        s = self.server.state
        return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "qflash"}

    def _models(self) -> None:
        self._outcome["status"] = 200
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, model_id: str) -> None:
        if model_id != self.server.state.model_id:
            raise ApiError(404, f"The model {json.dumps(model_id)[:200]} does not exist here; this server serves "
                           f"'{self.server.state.model_id}'", "model_not_found", "model")
        self._outcome["status"] = 200
        self._send_json(200, self._model_card())

    def _chat(self) -> None:
        state = self.server.state
        if not state.api_key:
            check_json_content_type(self.headers.get("Content-Type"))
        req = parse_chat_request(self._read_body(), state.model_id, state.defaults, state.defaults.max_new_tokens)
        job = state.scheduler.submit(req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": state.model_id}
        try:
            c = self._stream(job, head) if req.stream else self._reply(job, head)
        finally:
            if not job.done.is_set():
                job.stop("client_closed")  # whatever ended this thread early, the work stops too
        self._outcome.update(status=200, note=f"{c.prompt_tokens}+{c.completion_tokens} tokens"
                             f"{' (stream)' if req.stream else ''}")

    def _reply(self, job: Job, head: dict):
        self._wait_for(job, job.done)
        if job.error is not None:
            raise job.error
        c = job.completion
        self._send_json(200, {
            **head, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage(c),
        })
        return c

    def _stream(self, job: Job, head: dict):
        chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

        def delta(d: dict, finish: str | None = None) -> dict:
            return {**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}

        self._wait_for(job, job.started)
        if not job.started.is_set():  # refused before generating (prompt too long, stopping): a plain error
            raise job.error
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._headers_sent = True
        self._sse(delta({"role": "assistant", "content": ""}))
        while (text := self._next_piece(job)) is not None:
            self._sse(delta({"content": text}))
        if job.error is not None:
            self._end_stream_with(job.error)
        c = job.completion
        self._sse(delta({}, c.finish_reason))
        if job.request.include_usage:
            self._sse({**chunk, "choices": [], "usage": _usage(c)})
        self._sse("[DONE]")
        self._chunk(b"")  # end of the chunked body
        return c

    def _next_piece(self, job: Job) -> str | None:
        """The next streamed text, or None once the job is done and every piece was taken."""
        while True:
            try:
                return job.pieces.get(timeout=POLL)
            except queue.Empty:
                pass
            if job.done.is_set() and job.pieces.empty():
                return None
            if self._client_gone():
                job.stop("client_closed")
                raise _ClientGone()

    def _end_stream_with(self, err: ApiError) -> None:
        """Headers are out: the error goes as the last event, then the stream ends."""
        self._sse(err.body())
        self._chunk(b"")
        self.close_connection = True
        self._outcome.update(status=err.status, note=f"{err.code} (while streaming)")
        raise _Reported()


def _usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def make_server(state: ServeState, host: str, port: int) -> QflashServer:
    state.limits.checked()
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    cls = type("QflashServer", (QflashServer,), {"address_family": family})
    try:
        server = cls((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    server.table = ConnectionTable(connection_limit(state.limits.max_connections))
    state.scheduler = Scheduler(state.engine, state.limits.max_queue)
    server.state = state
    return server


def serve(engine: Engine, *, host: str, port: int, model_id: str, defaults: SamplingOptions,
          api_key: str | None = None, limits: ServeLimits | None = None) -> int:
    """Listen until Ctrl-C or SIGTERM, then print what was served. api_key: see resolve_api_key."""
    check_bind(host, api_key)
    state = ServeState(engine, model_id, replace(defaults), api_key, limits or ServeLimits())
    server = make_server(state, host, port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    print(f"qflash serve: {model_id} on http://{shown}:{bound_port}/v1 "
          f"(POST /v1/chat/completions, GET /v1/models, GET /health){'; API key required' if api_key else ''}; "
          f"max_tokens up to {defaults.max_new_tokens}; Ctrl-C stops", flush=True)

    def on_term(signum, frame):  # SIGTERM ends like Ctrl-C: leave serve_forever, close, summarize
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    t0 = time.perf_counter()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stuck = server.stop()
    w, t = state.scheduler.stats, server.table
    print(f"qflash serve: stopped after {time.perf_counter() - t0:.0f}s: {state.requests} requests "
          f"({state.errors} errors), {w.refused} refused as the queue was full, "
          f"{w.cancelled_queued + w.cancelled_running} cancelled; {w.tokens:,} tokens generated "
          f"({w.wasted_tokens:,} for cancelled replies); {t.accepted} connections, {t.refused} refused, "
          f"{t.closed_idle} idle ones closed for new ones"
          + (f"; {stuck} thread(s) did not end" if stuck else ""), flush=True)
    return 0
