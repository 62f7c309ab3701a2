"""A bounded soak of `python -m minillm serve` on the bundled model with a small KV pool (preemption and
eviction under way): mixed streaming and non-streaming completions and chats, n > 1, seeded repeats, clients
that leave mid-stream or mid-body, malformed and oversized bodies, hostile-but-legal settings, identical
greedy requests side by side. Afterwards the server must be as it was: no request holds a KV slot, the same
greedy answer, no traceback in its log, memory within a bound, and SIGTERM with streams in flight exits 0.
Every loop is bounded in count and time; the server listens on 127.0.0.1 and is stopped by the test."""

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from test_server import Server, call

GREEDY = {"prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}
CHAT = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "Sort a list of numbers."}]
ROUNDS = 240  # requests in the mixed load
CONCURRENCY = 24
DEADLINE_S = 240  # the mixed load must be done by then
RSS_GROWTH_KIB = 150 * 1024  # resident memory may grow this much over the load (allocator pools, caches)


def post(server, path, body, timeout=60):
    return call("POST", f"{server.url}{path}", body, timeout=timeout)


def stream_text(server, path, body, leave_after=None):
    """Read a server-sent-events stream: (text, finish reasons, usage); leave_after: hang up after that many
    events."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    try:
        connection.request(
            "POST", path, body=json.dumps({**body, "stream": True}), headers={"content-type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        text, reasons, events = "", [], 0
        while True:
            line = response.readline()
            assert line, "the stream ended without [DONE]"
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return text, reasons
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
            events += 1
            if leave_after is not None and events >= leave_after:
                connection.sock.shutdown(socket.SHUT_RDWR)
                return text, ["left"]
    finally:
        connection.close()


def leave_while_sending(server):
    """Send the headers and half a body, then hang up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"prompt": "half a bo'
        )


def job(server, greedy_text, i):
    """Request i of the mixed load; raises AssertionError if its answer is wrong."""
    kind = i % 12
    seed = 1000 + i
    if kind == 0:  # streaming completion
        text, reasons = stream_text(
            server, "/v1/completions", {"prompt": f"# task {i}\n", "max_tokens": 24, "temperature": 0.8, "seed": seed}
        )
        assert reasons in (["stop"], ["length"])
    elif kind == 1:  # non-streaming, n = 3, seeded
        r = post(
            server,
            "/v1/completions",
            {"prompt": "import os\n", "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": seed},
        )
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
    elif kind == 2:  # chat
        r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0.5, "seed": seed})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    elif kind == 3:  # streaming chat
        _, reasons = stream_text(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16})
        assert reasons in (["stop"], ["length"])
    elif kind == 4:  # a seeded request repeated gives the same text
        body = {"prompt": f"class Thing{i % 5}:", "max_tokens": 12, "temperature": 1.0, "seed": seed % 7}
        first, second = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
        assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    elif kind == 5:  # a client that leaves mid-stream
        stream_text(
            server,
            "/v1/completions",
            {"prompt": "while True:", "max_tokens": 200, "temperature": 1.0, "seed": seed, "ignore_eos": True},
            leave_after=2,
        )
    elif kind == 6:  # malformed bodies
        for body, status in (
            (b"{oops", 400),
            ({"prompt": 5}, 400),
            ({"prompt": "x", "seed": 2**64}, 400),
            ({"prompt": "x", "echo": 1}, 400),
            ({"prompt": "x", "temperature": "hot"}, 400),
            (b"x" * (2**20 + 10), 413),
        ):
            r = post(server, "/v1/completions", body)
            assert r.status_code == status and r.json()["error"]["message"], (body[:40], r.status_code, r.text)
    elif kind == 7:  # hostile but legal settings
        tiny_t = post(server, "/v1/completions", {**GREEDY, "temperature": 1e-40})
        assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == greedy_text
        for extra in (
            {"repetition_penalty": 1e-300, "temperature": 1.0},
            {"top_p": 1e-30, "temperature": 1.0},
            {"repetition_penalty": 1e300, "frequency_penalty": -2, "temperature": 1.5},
        ):
            r = post(server, "/v1/completions", {"prompt": "x = ", "max_tokens": 8, "seed": seed, **extra})
            assert r.status_code == 200, r.text
    elif kind in (8, 9):  # identical greedy requests side by side
        r = post(server, "/v1/completions", GREEDY)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text
    elif kind == 10:  # a client that leaves while sending its body
        leave_while_sending(server)
    else:  # a prompt too long for the pool: refused, everyone else unaffected
        r = post(server, "/v1/completions", {"prompt": "word " * 5000, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_mixed_soak_leaves_the_server_as_it_found_it():
    server = Server(None, "--kv-mb", "1", "--max-batch", "8", "--max-body-mb", "1")
    try:
        greedy_text = post(server, "/v1/completions", GREEDY).json()["choices"][0]["text"]
        rss_before = server.rss_kib()
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            failures = [f.exception() for f in [pool.submit(job, server, greedy_text, i) for i in range(ROUNDS)]]
        assert time.monotonic() - started < DEADLINE_S
        assert [f for f in failures if f is not None] == []

        # A large prompt is tokenized off the event loop: /health keeps answering meanwhile.
        big = {"messages": [{"role": "user", "content": "lorem ipsum dolor " * 17_000}], "max_tokens": 2}
        with ThreadPoolExecutor(3) as pool:
            bigs = [pool.submit(post, server, "/v1/chat/completions", big) for _ in range(3)]
            waits = []
            while not all(b.done() for b in bigs) and len(waits) < 200:
                t = time.monotonic()
                assert call("GET", f"{server.url}/health", timeout=10).status_code == 200
                waits.append(time.monotonic() - t)
        assert all(b.result().status_code == 400 for b in bigs)  # longer than the context
        assert max(waits, default=0) < 1.0, f"/health waited {max(waits):.2f} s while a prompt was tokenized"

        server.assert_idle_and_no_slot_owned()
        assert post(server, "/v1/completions", GREEDY).json()["choices"][0]["text"] == greedy_text
        rss_after = server.rss_kib()
        assert rss_after <= rss_before + RSS_GROWTH_KIB, f"resident memory {rss_before} -> {rss_after} KiB"

        # SIGTERM with streams in flight: they are served to their end, then the server exits 0.
        results, first = [], threading.Barrier(5, timeout=60)

        def long_stream(k):
            connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=120)
            body = {
                "prompt": f"for i in range({k}):",
                "max_tokens": 64,
                "temperature": 1.0,
                "seed": k,
                "ignore_eos": True,
                "stream": True,
            }
            connection.request(
                "POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"}
            )
            response = connection.getresponse()
            lines = [response.readline()]
            first.wait()
            lines += response.read().splitlines()
            results.append([line for line in lines if line.startswith(b"data: ")])

        threads = [threading.Thread(target=long_stream, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        first.wait()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 4 and all(r[-1] == b"data: [DONE]" for r in results)
        assert all(b'"finish_reason": "length"' in b"".join(r) for r in results)
    finally:
        code = server.stop()
    assert code == 0
    assert "Traceback" not in server.stderr and "ClientDisconnect" not in server.stderr, server.stderr[-3000:]
    assert "disconnected while sending" in server.stderr  # one quiet line per such client
