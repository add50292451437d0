"""qflash serve under hostile or careless clients: floods of idle connections and slow readers under a low
descriptor limit, a full queue, clients that leave, web pages on other sites, malformed and fuzzed bodies.

Each test prints the figures it measured (pytest -s shows them)."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serve import FRANCE

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tiny_engine(tiny_models):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(str(tiny_models["qwen2"]), device="cpu", quant="none"))


@pytest.fixture()
def start(tiny_engine):
    """start(ceiling) -> a server on the tiny model, in this process, with the default limits."""
    from qflash.infer.options import SamplingOptions
    from qflash.infer.serve import ServeState, make_server

    servers = []

    def run(ceiling: int = 8, api_key: str | None = None, **limits):
        extra = []
        if limits:  # imported only here: the tests without limits also run against a server that has none
            from qflash.infer.serve import ServeLimits

            extra = [ServeLimits(**limits)]
        state = ServeState(tiny_engine, "tiny", SamplingOptions(max_new_tokens=ceiling), api_key, *extra)
        srv = make_server(state, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield run
    for srv in servers:
        srv.shutdown()
        assert srv.stop(grace=5) == 0


def ask(port: int, body: dict, timeout: float = 20, headers: dict | None = None):
    return raw_timed(port, "POST", CHAT, json.dumps(body), {**JSON, **(headers or {})}, timeout)


def raw_timed(port, method, path, body=None, headers=None, timeout=20.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def post_and_leave(port: int, body: dict) -> socket.socket:
    """A request sent on a raw socket whose reply will never be read (close() it to leave)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


class Gate:
    """engine.complete held until open(); records the prompts in the order they reach the model, and what each
    generated (by the order of arrival)."""

    def __init__(self, engine, monkeypatch):
        self.engine, self.real, self.opened = engine, engine.complete, threading.Event()
        self.calls: list[str] = []
        self.tokens: dict[int, int] = {}
        self.entered = threading.Semaphore(0)
        monkeypatch.setattr(engine, "complete", self)

    def __call__(self, prompt, opts, on_text=None, cancel=None):
        from qflash.infer.engine import Cancelled

        index = len(self.calls)
        self.calls.append(self.engine.decode(prompt))
        self.entered.release()
        assert self.opened.wait(60)
        try:
            c = self.real(prompt, opts, on_text=on_text, cancel=cancel)
        except Cancelled as e:
            self.tokens[index] = getattr(e, "generated", 0)
            raise
        self.tokens[index] = c.completion_tokens
        return c

    def wait_for(self, text: str, timeout: float = 20) -> int | None:
        """The index of the call whose prompt holds text once it has ended, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [i for i, t in enumerate(self.calls) if text in t and i in self.tokens]
            if done:
                return done[0]
            time.sleep(0.05)
        return None


# ------------------------------------------------------------------------------------------------
# Finding 3: a bounded first-come-first-served queue; work for clients that left stops


def test_a_full_queue_refuses_with_429_and_serves_first_come_first_served(start, tiny_engine, monkeypatch):
    srv = start(ceiling=4)
    port = srv.server_address[1]
    gate = Gate(tiny_engine, monkeypatch)
    n = 24
    answers: dict[int, tuple] = {}

    def client(i: int) -> None:
        msg = [{"role": "user", "content": f"request {i}"}]
        try:
            status, headers, _ = ask(port, {"messages": msg, "max_tokens": 4}, timeout=30)
            answers[i] = (status, headers.get("Retry-After"))
        except OSError as e:  # a hung or dropped client: counted, and fails the test below
            answers[i] = (type(e).__name__, None)

    threads = []
    for i in range(n):  # one at a time, so the order of arrival is known
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
        if i == 0:
            assert gate.entered.acquire(timeout=20)  # request 0 holds the model
        time.sleep(0.15)
    gate.opened.set()
    for t in threads:
        t.join(40)
    statuses = [answers.get(i, ("hung", None))[0] for i in range(n)]
    served = [i for i in range(n) if statuses[i] == 200]
    refused = [i for i in range(n) if statuses[i] == 429]
    print(f"\nqueue: {n} clients, {len(served)} answered 200, {len(refused)} refused 429, "
          f"others {[s for s in statuses if s not in (200, 429)]}")
    assert set(statuses) <= {200, 429}, statuses
    assert len(refused) == n - 1 - 16, statuses  # 1 running + a queue of 16 (the default --max-queue)
    assert all(answers[i][1] for i in refused), "429 without Retry-After"
    reached = [int(re.search(r"request (\d+)", text).group(1)) for text in gate.calls]
    assert reached == served, "not first come, first served"


def test_concurrent_clients_on_the_real_model_are_answered_or_refused(start):
    srv = start(ceiling=8)
    port = srv.server_address[1]
    n = 20
    results: list = [None] * n

    def client(i: int) -> None:
        t0 = time.monotonic()
        try:
            status, headers, data = ask(port, {"messages": FRANCE, "max_tokens": 8, "stream": i % 2 == 1})
            results[i] = (status, time.monotonic() - t0)
        except OSError as e:
            results[i] = (type(e).__name__, time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = [r[0] if r else "hung" for r in results]
    print(f"\nconcurrent: {n} clients, {statuses.count(200)} answered, {statuses.count(429)} refused 429, "
          f"{statuses.count(503)} refused 503, slowest {max(r[1] for r in results if r):.1f}s")
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 17  # at least the running one and a full queue


def test_a_client_that_leaves_stops_its_work_before_and_during_generation(start, tiny_engine, monkeypatch):
    srv = start(ceiling=400)
    port = srv.server_address[1]
    gate = Gate(tiny_engine, monkeypatch)
    holder = threading.Thread(target=ask, args=(port, {"messages": FRANCE, "max_tokens": 2}))
    holder.start()
    assert gate.entered.acquire(timeout=20)
    waiting = [post_and_leave(port, {"messages": [{"role": "user", "content": f"queued {i}"}], "max_tokens": 400})
               for i in range(5)]  # queued behind the holder
    time.sleep(0.5)
    for sock in waiting:
        sock.close()
    time.sleep(0.3)
    gate.opened.set()
    holder.join(30)

    # during generation, not streamed and streamed: the client leaves once the model is at work
    during = []
    for stream in (False, True):
        text = f"during {'stream' if stream else 'reply'}"
        sock = post_and_leave(port, {"messages": [{"role": "user", "content": text}], "max_tokens": 400,
                                     "stream": stream})
        deadline = time.monotonic() + 20
        while not any(text in t for t in gate.calls) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        sock.close()
        index = gate.wait_for(text)
        during.append(gate.tokens.get(index))
    reached = [t for t in gate.calls if "queued" in t]
    print(f"\nleft: 5 clients left while queued -> {len(reached)} reached the model; 2 left while generating -> "
          f"{during} tokens generated of 400 asked")
    assert not reached, f"{len(reached)} requests of clients that had left were generated"
    assert all(t is not None and t < 200 for t in during), during
    assert ask(port, {"messages": FRANCE, "max_tokens": 3})[0] == 200
    health = json.loads(raw_timed(port, "GET", "/health")[2])
    assert health["requests"]["cancelled_queued"] == 5 and health["requests"]["cancelled_running"] == 2


def test_max_tokens_over_the_ceiling_is_refused_naming_the_limit(start):
    port = start(ceiling=8).server_address[1]
    for name in ("max_tokens", "max_completion_tokens"):
        status, _, data = ask(port, {"messages": FRANCE, name: 10**9})
        err = json.loads(data)["error"]
        assert (status, err["param"]) == (400, name) and "limit of 8" in err["message"], err
    status, _, data = ask(port, {"messages": FRANCE})  # none asked: the ceiling
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] <= 8


# ------------------------------------------------------------------------------------------------
# Finding 2: a client that does not read slows only itself


def test_a_client_that_stops_reading_its_stream_does_not_block_others(start, tiny_engine, monkeypatch):
    """The flooding reply is stubbed (megabytes of text, more than any socket buffer holds); the other
    request runs the real model (test_serve streams from the real model too)."""
    from qflash.infer.engine import Cancelled

    srv = start(ceiling=400)
    port = srv.server_address[1]
    real = tiny_engine.complete
    flooded = []

    def floods_for_the_flooder(prompt, opts, on_text=None, cancel=None):
        if "flood" not in tiny_engine.decode(prompt):
            return real(prompt, opts, on_text=on_text, cancel=cancel)
        for i in range(4000):  # 4000 pieces of 1 KiB
            if cancel is not None and cancel.is_set():
                flooded.append(i)
                raise Cancelled("generation cancelled")
            on_text("x" * 1024)
        flooded.append(4000)
        return real(prompt, opts, cancel=cancel)

    monkeypatch.setattr(tiny_engine, "complete", floods_for_the_flooder)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    data = json.dumps({"messages": [{"role": "user", "content": "flood"}], "stream": True}).encode()
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    time.sleep(1.0)  # the flood has filled every buffer between the server and this unread socket
    t0 = time.monotonic()
    status, _, _ = ask(port, {"messages": FRANCE, "max_tokens": 4}, timeout=15)
    waited = time.monotonic() - t0
    print(f"\nslow reader: another client answered in {waited:.2f}s; the flood stopped after {flooded} pieces")
    slow.close()
    assert status == 200 and waited < 5
    assert flooded and flooded[0] < 4000, "the stream of a client that does not read was not cancelled"


# ------------------------------------------------------------------------------------------------
# Finding 1: idle connections and slow readers under a low descriptor limit

SERVE_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from qflash.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_idle_and_slow_reader_floods_under_a_descriptor_limit(tiny_models):
    from test_serve import start_server

    proc, port, _ = start_server([str(tiny_models["qwen2"]), "--device", "cpu",
                                  "--quant", "none", "--max-new-tokens", "32", "--api-key", "k"],
                                 launcher=["-c", SERVE_UNDER_LIMIT])
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    t_start = time.monotonic()
    try:
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        t_idle = time.monotonic() - t_start
        body = json.dumps({"messages": FRANCE, "max_tokens": 8, "stream": True}).encode()
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
                          b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
            except OSError:
                pass
            slow.append(s)
        t0 = time.monotonic()
        status, _, data = ask(port, {"messages": FRANCE, "max_tokens": 4}, timeout=15,
                              headers={"Authorization": "Bearer k"})
        waited = time.monotonic() - t0
        closed = sum(_closed_by_server(s) for s in idle)
        health = json.loads(raw_timed(port, "GET", "/health")[2])
        print(f"\nserver: {health.get('connections')}")
        print(f"\nflood under 256 descriptors: {len(idle)} idle connections opened, {closed} closed by the server, "
              f"{len(slow)} slow readers; a valid client answered {status} in {waited:.2f}s (idle flood took {t_idle:.2f}s)")
        assert status == 200 and waited < 10
    finally:
        for s in idle + slow:
            s.close()
        proc.kill()
        proc.wait()


def test_silent_connections_and_trickled_bodies_are_closed_after_the_timeout(start):
    port = start(ceiling=4, timeout=1.0).server_address[1]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{")
    t0 = time.monotonic()
    for _ in range(4):  # a byte every 0.4s: never silent for the timeout, yet the body is late
        time.sleep(0.4)
        try:
            trickle.sendall(b" ")
        except OSError:
            break
    reply = trickle.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply[:200]
    assert idle.recv(1) == b"" and time.monotonic() - t0 < 5  # closed by the server
    idle.close()
    trickle.close()


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------
# Finding 4: without a key, only this machine (not a web page it shows) may drive the server


def test_foreign_host_origin_and_non_json_posts_are_refused_without_a_key(start):
    port = start(ceiling=4).server_address[1]
    body = json.dumps({"messages": FRANCE, "max_tokens": 2})
    cases = [({"Host": "evil.example", **JSON}, 403, "forbidden_host"),
             ({"Host": f"evil.example:{port}", **JSON}, 403, "forbidden_host"),
             ({"Origin": "http://evil.example", **JSON}, 403, "forbidden_origin"),
             ({"Origin": "null", **JSON}, 403, "forbidden_origin"),
             ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
             ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
             ({}, 415, "unsupported_media_type")]
    for headers, status, code in cases:
        got, _, data = raw_timed(port, "POST", CHAT, body, headers)
        assert (got, json.loads(data)["error"]["code"]) == (status, code), headers
    assert raw_timed(port, "GET", "/v1/models", None, {"Host": "rebound.example"})[0] == 403
    for headers in ({"Host": f"localhost:{port}", **JSON}, {"Host": f"[::1]:{port}", **JSON},
                    {"Origin": f"http://127.0.0.1:{port}", **JSON}, {"Content-Type": "application/json; charset=utf-8"}):
        assert raw_timed(port, "POST", CHAT, body, headers)[0] == 200, headers


def test_with_a_key_any_host_may_call(start):
    port = start(ceiling=4, api_key="k").server_address[1]
    body = json.dumps({"messages": FRANCE, "max_tokens": 2})
    assert raw_timed(port, "POST", CHAT, body, {"Host": "llm.example.org", "Authorization": "Bearer k", **JSON})[0] == 200


# ------------------------------------------------------------------------------------------------
# Finding 5: malformed bodies, methods and paths


def test_hostile_bodies_methods_and_paths_get_openai_errors(start, caplog):
    caplog.set_level(logging.INFO, logger="qflash.infer.serve")
    port = start(ceiling=4).server_address[1]
    bodies = [
        ("[" * 100_000 + "]" * 100_000, 400, "invalid_json"),
        ('{"messages": ' + "[" * 40 + "]" * 40 + "}", 400, "invalid_json"),
        ('{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', 400, "invalid_json"),
        ('{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "invalid_json"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_json"),
        ('{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 40 + "}", 400, "invalid_value"),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}", 400, "invalid_json"),
        ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 5}', 400, "invalid_value"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', 400, "invalid_value"),
    ]
    for body, status, code in bodies:
        got, _, data = raw_timed(port, "POST", CHAT, body.encode(), JSON)
        assert (got, json.loads(data)["error"]["code"]) == (status, code), body[:80]
    status, headers, data = raw_timed(port, "OPTIONS", CHAT)
    assert status == 204 and set(headers["Allow"].split(", ")) == {"POST", "OPTIONS"} and data == b""
    assert not any(h.lower().startswith("access-control") for h in headers)
    status, headers, data = raw_timed(port, "HEAD", "/health")
    assert status == 200 and headers["Content-Type"] == "application/json" and data == b""
    assert raw_timed(port, "HEAD", "/nope")[0] == 404
    status, headers, data = raw_timed(port, "BREW", "/health")
    assert status == 501 and headers["Content-Type"] == "application/json" and json.loads(data)["error"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # http.client refuses such a path
        sock.sendall(b"GET /v1/\x1b[2J\x1b]0;pwned\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, data = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and json.loads(data)["error"]["code"] == "not_found"
    assert "\x1b" not in caplog.text and "\x07" not in caplog.text and "\\x1b[2J" in caplog.text
    assert "Traceback" not in caplog.text


# ------------------------------------------------------------------------------------------------
# A schema fuzz: no body is a 500 or a dropped connection

JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(st.characters(exclude_categories=()), max_size=8))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | JSON_ANY,
                                 "content": st.text(max_size=40) | JSON_ANY})
BODY = st.fixed_dictionaries({}, optional={
    "model": st.just("tiny") | JSON_ANY, "messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON_ANY,
    "max_tokens": st.integers(-3, 6) | JSON_ANY, "max_completion_tokens": st.integers(-3, 6) | JSON_ANY,
    "temperature": st.floats(-1, 3, allow_nan=False) | JSON_ANY, "top_p": st.floats(-1, 2, allow_nan=False) | JSON_ANY,
    "seed": st.integers() | JSON_ANY, "repetition_penalty": st.floats(0, 3) | JSON_ANY,
    "stream": st.booleans() | JSON_ANY, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON_ANY,
    "n": st.integers(0, 3) | JSON_ANY, "stop": JSON_ANY, "tools": JSON_ANY, "response_format": JSON_ANY,
})
NEARLY_VALID = st.fixed_dictionaries(  # mostly answerable: the paths that generate get fuzzed too
    {"model": st.just("tiny"), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.text(st.characters(exclude_categories=()), max_size=30)}),
        min_size=1, max_size=2)},
    optional={"max_tokens": st.integers(-1, 5), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
              "seed": st.integers(-(2**70), 2**70), "repetition_penalty": st.floats(0, 2),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})
RAW = st.one_of(NEARLY_VALID.map(json.dumps), BODY.map(json.dumps), JSON_ANY.map(json.dumps)).map(str.encode) \
    | st.binary(max_size=64)


def test_fuzzed_bodies_never_get_a_500_or_a_dropped_connection(start, caplog):
    caplog.set_level(logging.INFO, logger="qflash.infer.serve")
    port = start(ceiling=4).server_address[1]
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(RAW)
    def one(body: bytes) -> None:
        status, headers, data = raw_timed(port, "POST", CHAT, body, JSON, timeout=20)  # a dropped one raises
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400, 404), (status, body[:200], data[:300])
        if status != 200:
            err = json.loads(data)["error"]
            assert set(err) == {"message", "type", "code", "param"} and err["message"], err
        elif headers.get("Content-Type", "").startswith("text/event-stream"):
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        else:
            assert json.loads(data)["choices"][0]["message"]["role"] == "assistant"

    one()
    print(f"\nfuzz: {sum(seen.values())} bodies, statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 150 and "internal error" not in caplog.text
