"""`qflash serve`: an OpenAI-compatible HTTP server for one model (chat completions, streaming, models).

Why the standard library's ThreadingHTTPServer and not an async framework: one model answers one
request at a time (generation holds a lock), so concurrency buys nothing beyond accepting
connections while a reply is generated; the protocol needed is small (JSON in and out, server-sent
events over chunked transfer encoding); and it adds no dependency.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions.
Errors are OpenAI-shaped JSON {"error": {"message", "type", "code", "param"}}: 400 unreadable or
incomplete requests, 401 missing/wrong API key, 404 unknown route or model, 405 wrong method,
411 no Content-Length, 413 body too large, 422 values out of range or features not supported.
A bug while answering is a 500 with the same JSON shape; the server keeps serving.

Stopping (Ctrl-C, SIGTERM): new connections are no longer accepted, a reply being generated is cut
within a token and answered 503 server_shutting_down, idle keep-alive connections are closed, and every
request thread is joined before the summary is printed. No thread that ran the model outlives the
server: a daemon thread still alive at interpreter exit could make the exit abort inside torch's C++
teardown ("terminate called without an active exception", exit status -6).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qflash.errors import ConfigError
from qflash.infer.engine import Cancelled, ContextOverflow, Engine
from qflash.infer.options import MessageError, SamplingOptions, check_messages

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes; a chat request is text, 4 MiB is far beyond any context window
LOOPBACK_NAMES = ("localhost",)
API_KEY_ENV = "QFLASH_API_KEY"
# Request fields that change what a reply is and that this server does not implement: refused
# rather than silently ignored. Each maps to the values that mean "not used".
UNSUPPORTED = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "logprobs": (None, False),
    "top_logprobs": (None, 0), "stop": (None, [], ""), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "n": (None, 1),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


@dataclass
class ServeState:
    engine: Engine
    model_id: str
    defaults: SamplingOptions
    api_key: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    counter_lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the server stops: generation in progress is cancelled, queued requests get 503."""

    def count(self, status: int, tokens: int = 0) -> None:
        with self.counter_lock:
            self.requests += 1
            self.errors += status >= 400
            self.tokens += tokens


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    opts: SamplingOptions
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ApiError(400, f"{name}: expected {'a number' if kind is float else 'an integer'}, got {json.dumps(value)}",
                       "invalid_type", name)
    return kind(value)


def parse_chat_request(raw: bytes, state: ServeState) -> ChatRequest:
    """The request body, checked; every problem is an ApiError naming the field."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if model is not None and model != state.model_id:
        raise ApiError(404, f"The model '{model}' does not exist here; this server serves '{state.model_id}' "
                       "(GET /v1/models)", "model_not_found", "model")
    if "messages" not in body:
        raise ApiError(400, "messages: required (a list of {\"role\", \"content\"} objects)", "missing_field", "messages")
    try:
        messages = check_messages(body["messages"])
    except MessageError as e:
        raise ApiError(400, str(e), "invalid_messages", e.field) from None
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise ApiError(422, f"{name}: not supported by qflash serve", "unsupported_parameter", name)
    d = state.defaults
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    opts = SamplingOptions(
        temperature=_number(body, "temperature", float, d.temperature),
        top_p=_number(body, "top_p", float, d.top_p),
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, d.max_new_tokens),
        repetition_penalty=_number(body, "repetition_penalty", float, d.repetition_penalty),
        seed=_number(body, "seed", int, d.seed),
    )
    bad = opts.problems()
    if bad:
        name, reason = bad[0]
        name = {"max_new_tokens": "max_tokens"}.get(name, name)
        raise ApiError(422, f"{name}: {reason}", "invalid_value", name)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: expected true or false, got {json.dumps(stream)}", "invalid_type", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise ApiError(400, "stream_options: expected an object", "invalid_type", "stream_options")
    return ChatRequest(messages, opts, stream, bool(so.get("include_usage", False)))


SHUTDOWN_GRACE = 10.0  # seconds a request thread gets to finish after stop, before its socket is cut


class QflashServer(ThreadingHTTPServer):
    daemon_threads = False  # joined in stop(); see the module docstring
    block_on_close = True
    state: ServeState

    def __init__(self, *args: Any, **kwargs: Any):
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def _cut(self, how: int) -> None:
        """socket.shutdown(how) on every open connection."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(how)
            except OSError:
                pass  # already closed by the client

    def stop(self, grace: float = SHUTDOWN_GRACE) -> int:
        """Cancel generation, end every connection, join every request thread; threads still running."""
        self.state.stopping.set()
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
        return sum(t.is_alive() for t in threads)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: QflashServer
    server_version = "qflash"

    # --------------------------------------------------------------------------------------------
    # Plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request is written by _handle, with the outcome

    def _send_json(self, status: int, payload: dict, close: bool = False, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _sse(self, payload: dict | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
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
            raise ApiError(400, f"Content-Length: not a number: {length!r}", "invalid_header") from None
        if n < 0:
            raise ApiError(400, f"Content-Length: negative: {n}", "invalid_header")
        if n > MAX_BODY:
            raise ApiError(413, f"request body of {n} bytes is over the limit of {MAX_BODY}", "body_too_large")
        return self.rfile.read(n)

    def _check_key(self) -> None:
        key = self.server.state.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                           type_="authentication_error")

    # --------------------------------------------------------------------------------------------
    # Dispatch

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def _route(self, method: str, path: str):
        """The handler for method + path; ApiError 404 (no such path) or 405 (path exists, other method)."""
        routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                  ("POST", "/v1/chat/completions"): self._chat}
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            routes[("GET", path)] = lambda: self._model(path[len("/v1/models/"):])
        if (method, path) in routes:
            return routes[(method, path)]
        allowed = sorted(m for m, p in routes if p == path)
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
            fn = self._route(method, path)
            if path != "/health":
                self._check_key()
            fn()
        except ApiError as e:
            self._outcome.update(status=e.status, note=e.code)
            if not self._headers_sent:
                # The body may be unread (a 401/404/413 before reading it): close, so no leftover bytes
                # are taken for the next request on this connection.
                self._send_json(e.status, e.body(), close=True, headers=e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self._outcome.update(status=499, note="client closed the connection")
            self.close_connection = True
        except _Reported:
            pass  # sent inside the stream already
        except OSError as e:  # the socket was cut while stopping (or another socket-level failure)
            self._outcome.update(status=499, note=f"connection failed: {e}")
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug in one request must not stop the server
            log.error("internal error on %s %s:\n%s", method, self.path, traceback.format_exc())
            self._outcome.update(status=500, note=f"{type(e).__name__}: {e}")
            if not self._headers_sent:
                err = ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error", type_="server_error")
                self._send_json(500, err.body(), close=True)
            else:
                self.close_connection = True
        finally:
            o = self._outcome
            self.server.state.count(o["status"], o.get("tokens", 0))
            log.info("%s %s \"%s %s\" %d %.2fs%s", time.strftime("%H:%M:%S"), self.client_address[0], method,
                     self.path, o["status"], time.perf_counter() - t0, f" {o['note']}" if o["note"] else "")

    # --------------------------------------------------------------------------------------------
    # Routes

    def _health(self) -> None:
        self._outcome["status"] = 200
        self._send_json(200, {"status": "ok", "model": self.server.state.model_id})

    def _model_card(self) -> dict:
        s = self.server.state
        return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "qflash"}

    def _models(self) -> None:
        self._outcome["status"] = 200
        self._send_json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, model_id: str) -> None:
        if model_id != self.server.state.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist here; this server serves "
                           f"'{self.server.state.model_id}'", "model_not_found", "model")
        self._outcome["status"] = 200
        self._send_json(200, self._model_card())

    def _chat(self) -> None:
        state = self.server.state
        req = parse_chat_request(self._read_body(), state)
        engine = state.engine
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": state.model_id}
        # One request at a time uses the model, and the tokenizer too: a fast tokenizer shared between
        # threads can fail with "Already borrowed".
        with state.lock:
            if state.stopping.is_set():
                raise _shutting_down()
            try:
                prompt = engine.prompt_ids(req.messages)
            except MessageError as e:
                raise ApiError(400, str(e), "invalid_messages", "messages") from None
            if len(prompt) >= engine.context_window:
                raise ApiError(400, f"the messages are {len(prompt)} tokens; this model's context window is "
                               f"{engine.context_window}", "context_length_exceeded", "messages")
            if req.stream:
                c = self._stream(engine, prompt, req, head)
            else:
                try:
                    c = engine.complete(prompt, req.opts, cancel=state.stopping)
                except ContextOverflow as e:
                    raise ApiError(400, str(e), "context_length_exceeded", "messages") from None
                except Cancelled:
                    raise _shutting_down() from None
                self._send_json(200, {
                    **head, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": _usage(c),
                })
        self._outcome.update(status=200, tokens=c.completion_tokens,
                             note=f"{c.prompt_tokens}+{c.completion_tokens} tokens{' (stream)' if req.stream else ''}")

    def _stream(self, engine: Engine, prompt: list[int], req: ChatRequest, head: dict):
        chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

        def delta(d: dict, finish: str | None = None) -> dict:
            return {**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._headers_sent = True
        self._sse(delta({"role": "assistant", "content": ""}))
        try:
            c = engine.complete(prompt, req.opts, on_text=lambda text: self._sse(delta({"content": text})),
                                cancel=self.server.state.stopping)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Cancelled:
            err = _shutting_down()
            self._sse(err.body())
            self._chunk(b"")
            self.close_connection = True
            self._outcome.update(status=err.status, note=f"{err.code} (while streaming)")
            raise _Reported() from None
        except Exception as e:  # noqa: BLE001 - headers are out: report in the stream, then end it
            log.error("internal error while streaming:\n%s", traceback.format_exc())
            self._sse(ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error",
                               type_="server_error").body())
            self._chunk(b"")
            self.close_connection = True
            self._outcome.update(status=500, note=f"{type(e).__name__}: {e} (while streaming)")
            raise _Reported() from e
        self._sse(delta({}, c.finish_reason))
        if req.include_usage:
            self._sse({**chunk, "choices": [], "usage": _usage(c)})
        self._sse("[DONE]")
        self._chunk(b"")  # end of the chunked body
        return c


class _Reported(Exception):
    """An error already sent to the client inside a stream."""


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; this request was not completed, send it again once "
                    "the server is back", "server_shutting_down", type_="server_error",
                    headers={"Retry-After": "30"})


def _usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def make_server(state: ServeState, host: str, port: int) -> QflashServer:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    cls = type("QflashServer", (QflashServer,), {"address_family": family})
    try:
        server = cls((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    server.state = state
    return server


def serve(engine: Engine, *, host: str, port: int, model_id: str, defaults: SamplingOptions,
          api_key: str | None = None) -> int:
    """Listen until Ctrl-C or SIGTERM, then print what was served. api_key: see resolve_api_key."""
    check_bind(host, api_key)
    state = ServeState(engine, model_id, replace(defaults), api_key)
    server = make_server(state, host, port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    print(f"qflash serve: {model_id} on http://{shown}:{bound_port}/v1 "
          f"(POST /v1/chat/completions, GET /v1/models, GET /health){'; API key required' if api_key else ''}; "
          "Ctrl-C stops", flush=True)

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
    print(f"qflash serve: stopped after {time.perf_counter() - t0:.0f}s: {state.requests} requests "
          f"({state.errors} errors), {state.tokens:,} tokens generated"
          + (f"; {stuck} request thread(s) did not end" if stuck else ""), flush=True)
    return 0
