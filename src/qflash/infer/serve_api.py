"""What `qflash serve` accepts and answers, torch-free: OpenAI-shaped errors, the chat request checked,
the checks that keep a web page from driving a local server, and log text safe for a terminal.

Status codes follow OpenAI's API: 400 for any request the server will not answer as sent (unreadable
JSON, a missing field, a value out of range, an unsupported parameter, max_tokens over the server's
ceiling, a prompt over the context window), 401 key, 403 a foreign Host or Origin, 404 route or model,
405 method, 408 a body that does not arrive in time, 411/413 body length, 415 not JSON, 429 queue full,
500 a bug (its details go to the server log only), 503 overloaded or shutting down.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from qflash.errors import ConfigError
from qflash.infer.options import MessageError, SamplingOptions, check_messages

LOOPBACK_NAMES = ("localhost",)
MAX_JSON_DEPTH = 32  # a chat request nests 5 deep (body > messages > message > content parts > part)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
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


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; this request was not completed, send it again once "
                    "the server is back", "server_shutting_down", type_="server_error",
                    headers={"Retry-After": "30"})


def internal_error(ref: str) -> ApiError:
    """A bug: the client learns that it happened and where to look, never the exception's text."""
    return ApiError(500, f"internal error (the server log has the details under {ref})", "internal_error",
                    type_="server_error")


def encode_json(payload: Any) -> bytes:
    """UTF-8 JSON. A lone surrogate (which JSON may carry as an escape) is written back as that same
    escape (backslashreplace gives exactly `\\udXXX`), where a plain encode would raise."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")


def printable(text: str, limit: int = 2000) -> str:
    """Text for the operator's terminal: control characters (escape sequences) shown escaped, not run."""
    out = "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in text[:limit])
    return out + (f"... ({len(text) - limit} more characters)" if len(text) > limit else "")


# ------------------------------------------------------------------------------------------------
# Where a request may come from (when no API key is set)

def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str | None:
    """The host of a Host header value (host, host:port, [v6]:port); None when unreadable."""
    try:
        return urlsplit(f"http://{value}").hostname
    except ValueError:
        return None


def check_origin(host: str | None, origin: str | None) -> None:
    """Without a key, only this machine may talk to the server. A browser sends the page's Origin, and
    after DNS rebinding a Host that names the attacker's domain: either one refuses the request."""
    if host is not None:
        name = _host_name(host)
        if name is None or not is_loopback(name):
            raise ApiError(403, f"Host {host!r}: this server answers only requests addressed to this machine "
                           "(localhost, 127.0.0.1, ::1); to serve other names, start it with --api-key",
                           "forbidden_host", type_="permission_error")
    if origin is not None and origin != "null":
        try:
            name = urlsplit(origin).hostname
        except ValueError:
            name = None
        if name is None or not is_loopback(name):
            raise ApiError(403, f"Origin {origin!r}: requests from web pages of other sites are refused; "
                           "start the server with --api-key to accept them", "forbidden_origin",
                           type_="permission_error")
    elif origin == "null":
        raise ApiError(403, "Origin 'null' (a sandboxed page or a local file): refused without --api-key",
                       "forbidden_origin", type_="permission_error")


def check_json_content_type(value: str | None) -> None:
    """A browser sends text/plain and form types cross-site without a preflight; JSON it cannot."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"Content-Type {value!r}: send the body as 'Content-Type: application/json'",
                       "unsupported_media_type")


# ------------------------------------------------------------------------------------------------
# The chat request

@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    opts: SamplingOptions
    max_tokens_given: bool
    """Whether the client named max_tokens (then prompt + max_tokens must fit the context window)."""
    stream: bool
    include_usage: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(body: Any) -> None:
    """Depth and text of every value, iteratively (a recursive walk could itself overflow)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"request body holds a lone UTF-16 surrogate ({value[e.start]!a}), which is "
                               "not text", "invalid_json") from None


def load_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       "invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep", "invalid_json") from None
    except ValueError as e:  # NaN/Infinity, an integer of more than 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    _check_tree(body)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    return body


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool)) else type(value).__name__
        raise ApiError(400, f"{name}: expected {'a number' if kind is float else 'an integer'}, got {shown[:80]}",
                       "invalid_type", name)
    try:
        return kind(value)
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"{name}: out of range", "invalid_value", name) from None


def _sampling(body: dict, defaults: SamplingOptions, ceiling: int) -> tuple[SamplingOptions, bool]:
    d = defaults
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    opts = SamplingOptions(
        temperature=_number(body, "temperature", float, d.temperature),
        top_p=_number(body, "top_p", float, d.top_p),
        max_new_tokens=_number({name: given}, name, int, ceiling),
        repetition_penalty=_number(body, "repetition_penalty", float, d.repetition_penalty),
        seed=_number(body, "seed", int, d.seed),
    )
    bad = opts.problems()
    if bad:
        field, reason = bad[0]
        field = {"max_new_tokens": name}.get(field, field)
        raise ApiError(400, f"{field}: {reason}", "invalid_value", field)
    if opts.max_new_tokens > ceiling:
        raise ApiError(400, f"{name}: {opts.max_new_tokens} is over this server's limit of {ceiling} new tokens "
                       "(qflash serve --max-new-tokens)", "invalid_value", name)
    if opts.seed is not None and not SEED_RANGE[0] <= opts.seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed: must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}", "invalid_value", "seed")
    return opts, given is not None


def parse_chat_request(raw: bytes, model_id: str, defaults: SamplingOptions, ceiling: int) -> ChatRequest:
    """The request body, checked; every problem is an ApiError naming the field.

    ceiling: the most new tokens a request may ask for; a request that names no max_tokens gets it.
    """
    body = load_json_object(raw)
    model = body.get("model")
    if model is not None and model != model_id:
        shown = json.dumps(model, ensure_ascii=False)[:200]
        raise ApiError(404, f"The model {shown} does not exist here; this server serves '{model_id}' "
                       "(GET /v1/models)", "model_not_found", "model")
    if "messages" not in body:
        raise ApiError(400, "messages: required (a list of {\"role\", \"content\"} objects)", "missing_field", "messages")
    try:
        messages = check_messages(body["messages"])
    except MessageError as e:
        raise ApiError(400, str(e), "invalid_messages", e.field) from None
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name}: not supported by qflash serve", "unsupported_parameter", name)
    opts, given = _sampling(body, defaults, ceiling)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected true or false", "invalid_type", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise ApiError(400, "stream_options: expected an object", "invalid_type", "stream_options")
    return ChatRequest(messages, opts, given, stream, bool(so.get("include_usage", False)))


@dataclass
class ServeLimits:
    """What one client, or many, may hold of the server (each is a `qflash serve` option)."""

    max_connections: int = 64
    """Open connections at most (lowered to fit the process's file-descriptor limit). At the limit a new
    connection closes the oldest one that has no request in progress, or else is answered 503."""
    max_queue: int = 16
    """Requests waiting for the model at most, served first come first served; beyond it a request is answered
    429 with Retry-After."""
    timeout: float = 30.0
    """Seconds a connection may stay silent (idle, slow headers or body) or leave the reply's bytes unread
    before it is closed."""

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.max_connections < 1:
            out.append(("max_connections", "must be >= 1"))
        if self.max_queue < 1:
            out.append(("max_queue", "must be >= 1"))
        if not self.timeout > 0:
            out.append(("timeout", "must be > 0 seconds"))
        return out

    def checked(self) -> "ServeLimits":
        """self, or a ConfigError naming every bad value as its option."""
        bad = self.problems()
        if bad:
            raise ConfigError("; ".join(f"--{f.replace('_', '-')}: {reason}" for f, reason in bad))
        return self
