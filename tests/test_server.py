"""python -m minillm serve, tested as a client sees it: a real server process on 127.0.0.1, the official
openai client, raw HTTP for what the client hides. Every server is stopped by its test; every load loop is
bounded in count and time."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from minillm import LLM

ROOT = Path(__file__).resolve().parents[1]


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


def call(method: str, url: str, body=None, timeout: float = 30) -> Reply:
    """One plain HTTP request (the openai client hides status codes and raw bodies)."""
    host, _, path = url.removeprefix("http://").partition("/")
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, "/" + path, body=data, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minillm",
                "serve",
                *(["--model", str(folder)] if folder else []),
                "--served-model-name",
                "tiny",
                "--port",
                str(self.port),
                *flags,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if call("GET", f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not come up within 60 s: {self.stderr}")

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        values = {}
        for line in call("GET", f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                values[name] = float(value)
        return values

    def assert_idle_and_no_slot_owned(self, timeout: float = 30) -> None:
        """Wait (bounded) until no request runs or waits; then every used KV slot is the prefix cache's."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m["minillm_requests_running"] == 0 and m["minillm_requests_waiting"] == 0:
                break
            time.sleep(0.1)
        m = self.metrics()
        assert m["minillm_requests_running"] == 0 and m["minillm_requests_waiting"] == 0
        assert m["minillm_kv_slots_used"] == m["minillm_kv_slots_cached"]  # no slot left owned by a request

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])

    def stop(self) -> int:
        """SIGTERM, as a service manager would send it; the server must exit by itself, with status 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.stderr = self.proc.stderr.read()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("served"), "qwen2", max_position_embeddings=512)


@pytest.fixture(scope="module")
def llm(folder):
    llm = LLM.load(folder)
    return llm


@pytest.fixture(scope="module")
def server(folder):
    server = Server(folder, "--kv-mb", "2", "--max-batch", "8")
    yield server
    assert server.stop() == 0
    assert "request 1:" in server.stderr and "tok/s" in server.stderr  # one log line per finished request


def reference(llm, prompt, **options):
    llm.configure()
    return llm.generate(prompt, use_prefix_cache=False, **options)


def test_completions_and_chat_equal_the_engine(server, llm):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for options in (dict(temperature=0), dict(temperature=0.9, top_p=0.95, seed=7)):
        expected = reference(llm, "The quick brown", max_new_tokens=10, **options)
        seed = options.pop("seed", None)
        out = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, seed=seed, **options)
        assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
        assert out.usage.prompt_tokens == expected.prompt_tokens
        assert out.usage.completion_tokens == len(expected.token_ids)
        pieces = client.completions.create(
            model="tiny", prompt="The quick brown", max_tokens=10, seed=seed, stream=True, **options
        )
        assert "".join(p.choices[0].text for p in pieces) == expected.text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = reference(llm, llm.tokenizer.encode_chat(messages), max_new_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == expected.text and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same conversation was just served


def test_prompt_forms_stop_n_and_logprobs(server, llm):
    client = server.client()
    ids = llm.tokenizer.encode("def add(a, b):")
    expected = reference(llm, ids, max_new_tokens=6, temperature=0, stop=["\n"])
    for prompt in ([ids, ids], ["def add(a, b):", "def add(a, b):"]):  # token-id lists, strings
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stop="\n")
        assert [c.text for c in out.choices] == [expected.text] * 2 and [c.index for c in out.choices] == [0, 1]
    several = client.completions.create(
        model="tiny", prompt="In the beginning", n=3, max_tokens=6, temperature=1.0, seed=3
    )
    assert len(several.choices) == 3 and len({c.text for c in several.choices}) > 1  # seed, seed+1, seed+2
    assert several.usage.prompt_tokens == len(llm.tokenizer.encode("In the beginning"))  # the prompt counts once
    lp = client.completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0, logprobs=2)
    lp = lp.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)
    past_eos = client.completions.create(
        model="tiny", prompt="The quick", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (
        past_eos.choices[0].text == reference(llm, "The quick", max_new_tokens=12, temperature=0, ignore_eos=True).text
    )
    assert past_eos.usage.completion_tokens == 12
    penalized = client.completions.create(
        model="tiny", prompt="The quick", max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    assert (
        penalized.choices[0].text
        == reference(
            llm, "The quick", max_new_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
        ).text
    )


def test_echo_logprobs_are_the_prompts_under_llm_logits(server, llm):
    """What lm-eval's local-completions sends to score a continuation: echo, logprobs, max_tokens 0 (or 1).
    Every prompt token's logprob is log_softmax(LLM.logits) at the position before it; the first has none."""
    text = "The quick brown fox jumps over the lazy dog."
    ids = llm.tokenizer.encode(text)
    expected = torch.log_softmax(llm.logits(ids), dim=-1)
    for prompt in (text, ids):
        reply = call(
            "POST", f"{server.url}/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}
        ).json()
        choice = reply["choices"][0]
        echoed = text if isinstance(prompt, str) else llm.tokenizer.decode(ids, skip_special_tokens=False)
        assert choice["text"] == echoed and reply["usage"]["completion_tokens"] == 0
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-5)
            assert max(lp["top_logprobs"][i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-5)
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    generated = reference(llm, text, max_new_tokens=3, temperature=0)
    reply = call(
        "POST",
        f"{server.url}/v1/completions",
        {"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 3, "temperature": 0},
    ).json()["choices"][0]
    assert reply["text"] == text + generated.text and len(reply["logprobs"]["tokens"]) == len(ids) + 3
    plain = call("POST", f"{server.url}/v1/completions", {"prompt": text, "echo": True, "max_tokens": 0}).json()
    assert plain["choices"][0]["text"] == text and plain["choices"][0]["logprobs"] is None


def test_tokenize_and_detokenize(server, llm):
    text = "def add(a, b):\n    return a + b"
    ids = call("POST", f"{server.url}/tokenize", {"prompt": text}).json()
    assert ids["tokens"] == llm.tokenizer.encode(text) and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == 512
    messages = [{"role": "user", "content": "hi"}]
    chat = call("POST", f"{server.url}/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == llm.chat_ids(messages)
    back = call("POST", f"{server.url}/detokenize", {"tokens": ids["tokens"]}).json()
    assert back == {"prompt": "<s>" + text}  # special tokens kept, as vLLM keeps them
    for route, body, param in (
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {"prompt": text, "messages": messages}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": text, "add_special_tokens": 1}, "add_special_tokens"),
    ):
        reply = call("POST", f"{server.url}{route}", body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_sixteen_concurrent_streams_equal_their_lone_results(server, llm):
    doc = "The quick brown fox jumps over the lazy dog. " * 3
    questions = [f"Question {i}: what did the fox do?" for i in range(16)]
    expected = [reference(llm, doc + q, max_new_tokens=8, temperature=0).text for q in questions]
    client = server.client()
    client.completions.create(model="tiny", prompt=doc + "warm-up", max_tokens=1)  # an earlier request with the doc

    def one(question):
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=doc + question,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, questions))
    assert [text for text, _ in results] == expected
    assert all(usage.prompt_tokens_details.cached_tokens > 0 for _, usage in results)


def test_a_client_that_disconnects_mid_stream_frees_its_request(server):
    body = {
        "model": "tiny",
        "prompt": "The quick brown fox",
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
    }
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")  # one chunk, then hang up
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    server.assert_idle_and_no_slot_owned()
    aborted = [
        line
        for line in call("GET", f"{server.url}/metrics").text.splitlines()
        if line.startswith('minillm_requests_total{finish_reason="abort"}')
    ]
    assert aborted and float(aborted[0].split()[1]) == 1


BAD = [
    ("not json", b"{oops", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("no prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt wrong type", {"prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature out of range", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p out of range", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("stop wrong type", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("ignore_eos wrong type", {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("unknown field", {"prompt": "x", "best_of_luck": 1}, 400, "best_of_luck"),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 400, "model"),
    ("seed above 64 bits", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("seed below 64 bits", {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
    ("the last choice's seed above 64 bits", {"prompt": "x", "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    ("temperature as a string", {"prompt": "x", "temperature": "0.5"}, 400, "temperature"),
    ("max_completion_tokens zero", {"prompt": "x", "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("echo with stream", {"prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ("echo 1", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("max_tokens zero without echo", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("suffix", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("best_of true", {"prompt": "x", "best_of": True}, 400, "best_of"),
    ("stop string too long", {"prompt": "x", "stop": "y" * 2000}, 400, "stop"),
    ("five stop strings", {"prompt": "x", "stop": list("abcde")}, 400, "stop"),
    ("a body nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("token ids as floats", {"prompt": [5.5, 6.0]}, 400, "prompt"),
    ("prompt too long", {"prompt": list(range(2, 302)) * 2}, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [5, 99999]}, 400, "prompt"),
]


@pytest.mark.parametrize("case", [b[0] for b in BAD])
def test_bad_requests_get_their_status_and_an_openai_error(server, case):
    _, body, status, param = next(b for b in BAD if b[0] == case)
    response = call("POST", f"{server.url}/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    if case == "prompt too long":
        assert "600 tokens" in error["message"] and "512" in error["message"]  # both lengths
    assert call("GET", f"{server.url}/health").status_code == 200  # still serving


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """413 from the declared length, and for a chunked body (no declared length) once the limit is passed."""
    body = json.dumps({"prompt": "x" * (5 * 2**20)}).encode()  # the default limit is 4 MiB
    response = call("POST", f"{server.url}/v1/completions", body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        pieces = (body[i : i + 2**20] for i in range(0, len(body), 2**20))
        connection.request(
            "POST", "/v1/completions", body=pieces, encode_chunked=True, headers={"content-type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "body_too_large"
    finally:
        connection.close()
    assert call("GET", f"{server.url}/health").status_code == 200


def test_hostile_but_legal_settings_are_served(server, llm):
    """They made the whole batch fail before (NaN probabilities inside the engine's step)."""
    expected = reference(llm, "The quick brown", max_new_tokens=10, temperature=0)
    tiny = call(
        "POST", f"{server.url}/v1/completions", {"prompt": "The quick brown", "max_tokens": 10, "temperature": 1e-40}
    )
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == expected.text  # greedy
    penalty = call(
        "POST",
        f"{server.url}/v1/completions",
        {"prompt": "The quick brown", "max_tokens": 10, "temperature": 1.0, "repetition_penalty": 1e-300},
    )
    assert penalty.status_code == 200 and penalty.json()["choices"][0]["finish_reason"] in ("stop", "length")
    last_seed = call(
        "POST",
        f"{server.url}/v1/completions",
        {"prompt": "x", "max_tokens": 2, "temperature": 1.0, "seed": 2**64 - 2, "n": 2},
    )
    assert last_seed.status_code == 200 and len(last_seed.json()["choices"]) == 2


def test_bad_chat_request(server):
    response = call("POST", f"{server.url}/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_bounded_load_has_no_errors_and_memory_does_not_grow(server):
    """200 requests at concurrency 32, in two rounds of 100: no error, and the second round leaves the
    process no larger than the first (beyond allocator noise)."""
    client = server.client()

    def one(i):
        out = client.completions.create(
            model="tiny", prompt=f"Request {i % 10}: the quick brown fox", max_tokens=4, temperature=0.5, seed=i
        )
        return out.choices[0].finish_reason

    rss = []
    started = time.monotonic()
    for round_ in range(2):
        with ThreadPoolExecutor(32) as pool:
            reasons = list(pool.map(one, range(100 * round_, 100 * round_ + 100)))
        assert all(r in ("stop", "length") for r in reasons)
        rss.append(server.rss_kib())
        assert time.monotonic() - started < 300
    assert rss[1] <= rss[0] * 1.05 + 8 * 1024, f"resident memory grew from {rss[0]} KiB to {rss[1]} KiB"
    m = server.metrics()
    assert m["minillm_requests_running"] == 0 and m["minillm_kv_slots_used"] == m["minillm_kv_slots_cached"]


def test_api_key_and_a_full_queue(folder):
    server = Server(folder, "--api-key", "secret", "--max-waiting", "0")
    try:
        no_key = call("POST", f"{server.url}/v1/completions", {"prompt": "x"})
        assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert [m.id for m in server.client("secret").models.list().data] == ["tiny"]
        with pytest.raises(openai.RateLimitError):  # nothing may wait, so every request is refused
            server.client("secret").completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        assert server.stop() == 0


def test_sigint_lets_a_running_stream_finish_then_exits_0(folder):
    server = Server(folder)
    first_chunk, chunks = threading.Event(), []

    def client():
        stream = server.client().completions.create(
            model="tiny",
            prompt="The quick",
            max_tokens=400,
            temperature=1.0,
            seed=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for c in stream:
            chunks.append(c)
            first_chunk.set()

    thread = threading.Thread(target=client)
    thread.start()
    assert first_chunk.wait(timeout=60)
    server.proc.send_signal(signal.SIGINT)  # while the stream runs
    assert server.proc.wait(timeout=60) == 0
    thread.join(timeout=60)
    assert server.stop() == 0
    assert chunks[-1].usage.completion_tokens == 400  # the running request was served to its end


def test_serve_without_the_server_extra_says_what_to_install(tmp_path):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn'):\n"
        "            raise ImportError('No module named ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from minillm.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert result.returncode == 2 and "pip install 'minillm[serve]'" in result.stderr


def test_a_port_in_use_is_one_line_and_status_2(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "minillm", "serve", "--model", str(folder), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert result.returncode == 2 and "could not listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_speculation_in_the_server_keeps_the_answer_and_reports_the_drafts(folder):
    """--exact --speculate draft with the checkpoint itself as the draft model: its greedy guesses are the
    model's; the answer is exact mode's plain answer, and usage and /metrics count the guesses."""
    expected = LLM.load(folder, exact=True).generate("The quick brown fox", max_new_tokens=24, temperature=0)
    assert len(expected.token_ids) > 4
    server = Server(folder, "--kv-mb", "2", "--exact", "--speculate", "draft", "--draft-model", str(folder))
    try:
        reply = server.client().completions.create(
            model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0
        )
        assert reply.choices[0].text == expected.text
        details = reply.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0
        m = server.metrics()
        assert m["minillm_draft_accepted_tokens_total"] == details.accepted_prediction_tokens
        assert m["minillm_draft_proposed_tokens_total"] == (
            details.accepted_prediction_tokens + details.rejected_prediction_tokens
        )
        server.assert_idle_and_no_slot_owned()
    finally:
        assert server.stop() == 0
