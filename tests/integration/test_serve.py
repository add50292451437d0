"""qflash serve: the official openai client against a real server process; bad requests; keys; bugs."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from qflash.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, model: str):
        self.proc, self.port, self.model = proc, port, model

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=300)


def start_server(args: list[str], timeout: float = 300,
                 launcher: tuple[str, ...] = ("-m", "qflash.cli")) -> tuple[subprocess.Popen, int, str]:
    """`qflash serve ... --port 0` in a subprocess; the port it bound, from its first line."""
    proc = subprocess.Popen([sys.executable, *launcher, "serve", *args, "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("qflash serve: "):
                model, url = line.split()[2], line.split()[4]
                return proc, int(url.rsplit(":", 1)[1].split("/")[0]), model
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the server did not start:\n" + proc.stderr.read()[-3000:])


@pytest.fixture(scope="module")
def server(smol_dir):
    proc, port, model = start_server([str(smol_dir), "--device", "cpu", "--max-new-tokens", "32"])
    yield Server(proc, port, model)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def raw(port: int, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    if isinstance(body, str):
        body = body.encode()
    headers = dict(headers or {})
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else None


def expected_prompt_tokens(smol_tokenizer, messages) -> int:
    from qflash.data.template import ChatRenderer

    return len(ChatRenderer(smol_tokenizer).prompt_ids(messages))


def test_openai_client_models_and_chat(server, smol_tokenizer):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model] == ["smollm2-135m-instruct"]
    r = client.chat.completions.create(model=server.model, messages=FRANCE, max_tokens=16)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == expected_prompt_tokens(smol_tokenizer, FRANCE)
    assert r.usage.completion_tokens == 8  # 7 text tokens + the end-of-turn token
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    short = client.chat.completions.create(model=server.model, messages=FRANCE, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert choice.message.content.startswith(short.choices[0].message.content)


def test_openai_client_streaming(server):
    client = server.client()
    stream = client.chat.completions.create(model=server.model, messages=FRANCE, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "streamed in pieces"
    assert "".join(pieces) == "The capital of France is Paris."
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_sampling_with_a_seed_is_reproducible_and_samples(server):
    """A seeded temperature-0.9 reply is reproducible and is not the greedy one (sampling happens); top_p is
    applied: a nucleus so small that only the most likely token is left gives the greedy reply back."""
    client = server.client()

    def ask(**sampling):
        return client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
            **sampling).choices[0].message.content

    sampled = ask(temperature=0.9, top_p=0.95, seed=7)
    greedy = ask(temperature=0)
    assert sampled == ask(temperature=0.9, top_p=0.95, seed=7)
    assert sampled != greedy, "temperature 0.9 gave the greedy reply: sampling is not applied"
    assert ask(temperature=0.9, top_p=1e-6, seed=7) == greedy, "top_p is not applied"


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    port, good = server.port, {"model": server.model, "messages": FRANCE, "max_tokens": 3}
    cases = [
        ("POST", "/v1/chat/completions", '{"model": "x", "messages": [', 400, "invalid_json"),
        ("POST", "/v1/chat/completions", "[1, 2]", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "model": "gpt-4o"}), 404, "model_not_found"),
        ("POST", "/v1/chat/completions", json.dumps({"model": server.model}), 400, "missing_field"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "messages": []}), 400, "invalid_messages"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "messages": [{"role": "user"}]}), 400, "invalid_messages"),
        ("POST", "/v1/chat/completions",
         json.dumps({**good, "messages": FRANCE + [{"role": "assistant", "content": "Paris"}]}), 400, "invalid_messages"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "temperature": "hot"}), 400, "invalid_type"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "temperature": 500}), 400, "invalid_value"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "max_tokens": 0}), 400, "invalid_value"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "n": 2}), 400, "unsupported_parameter"),
        ("POST", "/v1/chat/completions", json.dumps({**good, "stream": "yes"}), 400, "invalid_type"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        ("POST", "/v1/completions", json.dumps(good), 404, "not_found"),
        ("GET", "/v1/models/nope", None, 404, "model_not_found"),
    ]
    for method, path, body, status, code in cases:
        got, headers, payload = raw(port, method, path, body, {"Content-Type": "application/json"})
        assert (got, payload["error"]["code"]) == (status, code), (body, payload)
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
        assert payload["error"]["type"] == "invalid_request_error"
        if status == 405:
            assert headers["Allow"] == "POST"
    missing = next(c for c in cases if c[4] == "missing_field")
    _, _, payload = raw(port, *missing[:3])
    assert payload["error"]["param"] == "messages"

    # a body over the limit is refused before it is read; no Content-Length at all is 411
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()

    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=FRANCE)
    status, _, payload = raw(port, "POST", "/v1/chat/completions", json.dumps(good))
    assert status == 200 and payload["choices"][0]["message"]["content"] == "The capital of"
    health = raw(port, "GET", "/health")[2]
    assert (health["status"], health["model"]) == ("ok", server.model)


def test_sigterm_stops_with_a_summary_and_every_request_was_logged(server):
    server.proc.send_signal(signal.SIGTERM)
    out, err = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 0, err[-3000:]
    assert "qflash serve: stopped after" in out and "errors)" in out
    log = [line for line in err.splitlines() if '"' in line]
    assert any('"POST /v1/chat/completions" 200' in line and "(stream)" in line for line in log)
    assert any('"POST /v1/chat/completions" 404' in line and "model_not_found" in line for line in log)
    assert any('"GET /v1/chat/completions" 405' in line for line in log)


# ------------------------------------------------------------------------------------------------
# In-process, on a tiny model: API keys, a bug inside a request, where the server may listen.

@pytest.fixture(scope="module")
def tiny_engine(tiny_models):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(str(tiny_models["qwen2"]), device="cpu", quant="none"))


@pytest.fixture()
def local_server(tiny_engine):
    from qflash.infer.options import SamplingOptions
    from qflash.infer.serve import ServeState, make_server

    servers = []

    def start(api_key: str | None = None, server: bool = False, ceiling: int = 4, **limits):
        from qflash.infer.serve import ServeLimits

        state = ServeState(tiny_engine, "tiny", SamplingOptions(max_new_tokens=ceiling), api_key, ServeLimits(**limits))
        srv = make_server(state, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv if server else srv.server_address[1]

    yield start
    for srv in servers:
        srv.shutdown()
        assert srv.stop() == 0


def test_api_key_is_required_when_set(local_server):
    port = local_server(api_key="s3cret")
    body = json.dumps({"model": "tiny", "messages": FRANCE})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, _, payload = raw(port, "POST", "/v1/chat/completions", body, headers)
        assert status == 401 and payload["error"]["type"] == "authentication_error"
    assert raw(port, "GET", "/v1/models")[0] == 401
    assert raw(port, "GET", "/health")[0] == 200
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=FRANCE).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()


def test_a_bug_in_a_request_is_a_500_and_the_server_keeps_serving(local_server, tiny_engine, monkeypatch):
    port = local_server()
    real = tiny_engine.complete
    calls = []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "complete", broken_once)
    body = {"model": "tiny", "messages": FRANCE}
    status, _, payload = raw(port, "POST", "/v1/chat/completions", json.dumps(body))
    assert status == 500 and payload["error"]["type"] == "server_error"
    assert "injected fault" not in payload["error"]["message"]  # the details are the operator's (the log)

    # the same fault while streaming: headers are out, so the error arrives as an event and the stream ends
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [line for line in resp.read().decode().split("\n\n") if line]
    conn.close()
    assert resp.status == 200
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "internal_error"

    status, _, payload = raw(port, "POST", "/v1/chat/completions", json.dumps(body))
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1


def test_binding_beyond_loopback_needs_a_key():
    from qflash.infer.serve import check_bind

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.org"):
        with pytest.raises(ConfigError, match="needs an API key"):
            check_bind(host, None)
        check_bind(host, "key")


def test_cli_refuses_public_bind_without_key_before_loading():
    env = {k: v for k, v in os.environ.items() if k != "QFLASH_API_KEY"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qflash.cli", "serve", "--host", "0.0.0.0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "qflash: error: --host 0.0.0.0: serving beyond this machine needs an API key; pass --api-key KEY or set "
        "QFLASH_API_KEY (clients then send 'Authorization: Bearer KEY'), or bind to 127.0.0.1"]
    assert time.perf_counter() - t0 < 60


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(local_server, tiny_engine, caplog):
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="qflash.infer.serve")
    port = local_server(ceiling=400)
    body = json.dumps({"model": "tiny", "messages": FRANCE, "stream": True, "max_tokens": 400}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has begun
    sock.close()
    status, _, payload = raw(port, "POST", "/v1/chat/completions",
                             json.dumps({"model": "tiny", "messages": FRANCE, "max_tokens": 3}))
    assert status == 200 and payload["usage"]["completion_tokens"] >= 1
    deadline = time.monotonic() + 10
    while "499" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"POST /v1/chat/completions" 499' in caplog.text and "client closed the connection" in caplog.text


def test_stopping_cancels_the_reply_in_progress_ends_idle_connections_and_joins_every_thread(
        local_server, tiny_engine, monkeypatch):
    """What `qflash serve` does on Ctrl-C/SIGTERM; the earlier daemon threads made the exit abort (-6)."""
    import socket

    srv = local_server(server=True, ceiling=400)
    port = srv.server_address[1]
    real, started = tiny_engine.complete, threading.Event()

    def held_until_stop(prompt, opts, on_text=None, cancel=None):
        started.set()
        assert cancel.wait(30)  # set by stop()
        return real(prompt, opts, on_text=on_text, cancel=cancel)  # cancelled at its first token

    monkeypatch.setattr(tiny_engine, "complete", held_until_stop)
    idle = socket.create_connection(("127.0.0.1", port), timeout=60)  # keep-alive, no request yet
    answers: dict = {}

    def ask(stream: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": FRANCE, "max_tokens": 400, "stream": stream}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answers[stream] = (resp.status, dict(resp.getheaders()), resp.read().decode())
        conn.close()

    plain = threading.Thread(target=ask, args=(False,))
    plain.start()
    assert started.wait(30)
    streamed = threading.Thread(target=ask, args=(True,))  # queued behind the running one
    streamed.start()
    deadline = time.monotonic() + 30
    while srv.state.scheduler.waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.state.scheduler.waiting() == 1  # the streamed request waits for the model
    srv.shutdown()
    assert srv.stop(grace=20) == 0
    plain.join(30)
    streamed.join(30)
    status, headers, body = answers[False]
    assert status == 503 and json.loads(body)["error"]["code"] == "server_shutting_down"
    assert headers["Retry-After"] == "30"
    status, _, body = answers[True]  # queued: it meets the flag before generating
    assert status == 503 and json.loads(body)["error"]["code"] == "server_shutting_down"
    assert idle.recv(1) == b""  # the idle connection was closed by the server
    idle.close()
    assert not [t.name for t in threading.enumerate() if "process_request_thread" in t.name]
    assert not srv.state.scheduler.thread.is_alive()
    assert (srv.state.requests, srv.state.errors) == (2, 2)


def test_a_cancelled_stream_ends_with_a_shutting_down_event(local_server, tiny_engine, monkeypatch):
    srv = local_server(server=True, ceiling=400)
    real = tiny_engine.complete

    def stop_after_first_piece(prompt, opts, on_text=None, cancel=None):
        def on_piece(text):
            on_text(text)
            srv.state.scheduler.running.stop("shutting_down")  # as stop() does, mid-reply

        return real(prompt, opts, on_text=on_piece, cancel=cancel)

    monkeypatch.setattr(tiny_engine, "complete", stop_after_first_piece)
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": FRANCE, "max_tokens": 400, "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [e.removeprefix("data: ") for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert resp.status == 200
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [json.loads(e)["choices"][0] for e in events[1:-1]]  # what was generated before the cut
    assert pieces and all(p["delta"]["content"] and p["finish_reason"] is None for p in pieces)
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"


def test_engine_cancel_stops_generation_with_cancelled(tiny_engine):
    from qflash.infer.engine import Cancelled
    from qflash.infer.options import SamplingOptions

    opts = SamplingOptions(max_new_tokens=8)
    cancel = threading.Event()
    done = tiny_engine.complete([1, 2, 3], opts, cancel=cancel)  # never set: an ordinary reply
    assert done.completion_tokens >= 1
    cancel.set()
    with pytest.raises(Cancelled) as stopped:
        tiny_engine.complete([1, 2, 3], opts, cancel=cancel)
    assert stopped.value.generated == 1  # the first token, then the stop (what serve counts as wasted)
