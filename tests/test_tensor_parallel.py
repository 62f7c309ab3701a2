"""Tensor parallelism (tensor_parallel.py, ranks.py): two ranks on CPU over gloo, one thread each.

The split must not change what the model computes: TP=2 logits equal TP=1 within 1e-5 (fp32, plain F.linear
path) for every family's quirks (GQA, Qwen2's biases, Qwen3's q/k norms, tied embeddings, a vocabulary two
does not divide, one kv head replicated on both ranks, row-parallel biases), and greedy continuations are
identical. The prefix cache and batching keep their guarantees across ranks. A rank that dies or hangs
ends the other with one line within the timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm import LLM
from minillm.errors import MinillmError
from minillm.model.tensor_parallel import TensorParallel, check

pytest.importorskip("transformers")  # the checkpoints are written by transformers' save_pretrained

# Each case: family and config overrides; what it exercises.
CASES = {
    "llama-gqa-biases-odd-vocab": ("llama", dict(attention_bias=True, mlp_bias=True, vocab_size=321)),
    "qwen2-biases-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm-one-kv-head": ("qwen3", dict(num_key_value_heads=1)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=12)),
}
PROMPTS = [[0, 5, 9, 17, 33, 2, 40, 41, 42, 7], [0, 5, 9, 17, 33, 2, 60, 61], [0, 100, 101, 102, 103, 104, 105]]
TIMEOUT_S = 10  # MINILLM_TP_TIMEOUT for the failure tests


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setenv("MINILLM_TP_TIMEOUT", str(TIMEOUT_S))


def test_splits_the_shapes_do_not_allow_are_refused_in_one_line(checkpoint):
    from minillm.model.config import load_config

    config = load_config(checkpoint("llama"))  # 4 heads, 2 kv heads, MLP 128
    for size, what in ((3, "4 attention heads"), (8, "4 attention heads"), (0, "at least 1")):
        with pytest.raises(MinillmError, match=what):
            check(config, size)
    with pytest.raises(MinillmError, match="MLP size"):
        check(dataclasses.replace(config, intermediate_size=126), 4)
    with pytest.raises(MinillmError, match="kv heads"):  # 6 ranks over 4 kv heads: neither divides the other
        check(dataclasses.replace(config, num_heads=12, num_kv_heads=4, intermediate_size=120), 6)
    check(config, 4)  # 4 ranks over 2 kv heads: each kv head on two ranks


def test_slices_put_back_together_are_the_checkpoint(checkpoint):
    """Column slices concatenated, row slices side by side, vocabulary rows stacked (padding dropped) give
    back each tensor; replicated kv heads are the right head; a row-parallel bias lives on rank 0 only."""
    from minillm.loading.loader import _weight_files, read_tensors
    from minillm.loading.safetensors_mmap import SafetensorsFile
    from minillm.model.config import load_config

    folder = checkpoint("llama", attention_bias=True, mlp_bias=True, vocab_size=321)
    config = load_config(folder)
    names = _weight_files(folder)
    tensors = read_tensors([SafetensorsFile(p) for p in names], names)
    ranks = [TensorParallel(config, r, 2) for r in range(2)]
    for name, t in tensors.items():
        parts = [tp.slice(name, t, config) for tp in ranks]
        if name.endswith(("o_proj.bias", "down_proj.bias")):
            assert torch.equal(parts[0], t) and not parts[1].any(), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(parts, dim=1), t), name
        elif "norm" in name:
            assert all(p is t for p in parts), name
        else:
            assert torch.equal(torch.cat(parts)[: t.shape[0]], t), name
    k = tensors["model.layers.0.self_attn.k_proj.weight"]  # [2 kv heads * 16, 64]
    replicated = [TensorParallel(config, r, 4) for r in range(4)]  # 4 ranks, 2 kv heads: ranks 0,1 -> head 0
    heads = [tp.slice("model.layers.0.self_attn.k_proj.weight", k, config) for tp in replicated]
    assert torch.equal(heads[0], k[:16]) and torch.equal(heads[1], k[:16]) and torch.equal(heads[3], k[16:])


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_compute_what_one_does(checkpoint, case):
    family, overrides = CASES[case]
    folder = checkpoint(family, **overrides)
    one = LLM.load(folder, dtype="float32", prepack=False)
    two = LLM.load(folder, dtype="float32", prepack=False, tp=2)
    try:
        for prompt in PROMPTS:
            a, b = one.logits(prompt), two.logits(prompt)
            assert a.shape == b.shape == (len(prompt), one.config.vocab_size)
            assert (a - b).abs().max() <= 1e-5, f"{case}: {(a - b).abs().max():.2e}"
        options = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
        alone = one.generate(PROMPTS, **options)
        split = two.generate(PROMPTS, **options)
        assert [c.token_ids for c in split] == [c.token_ids for c in alone]
        two.engine.scheduler.check_invariants()
        pool = two.engine.pool.keys  # [layers, kv_heads / 2, slots, head_dim]: this rank's heads only
        assert pool.shape[1] == max(1, one.config.num_kv_heads // 2)
    finally:
        two.close()


def test_prepacked_weights_split_too(checkpoint):
    folder = checkpoint("qwen2")
    one, two = LLM.load(folder, dtype="float32"), LLM.load(folder, dtype="float32", tp=2)
    try:
        assert two.model.weight_form == "prepacked"
        assert (one.logits(PROMPTS[0]) - two.logits(PROMPTS[0])).abs().max() <= 1e-4
    finally:
        two.close()


def test_prefix_cache_and_batching_keep_their_guarantees_across_ranks(checkpoint):
    """Exact mode on two ranks: a request's logits are bitwise the same cold and alone, or cached and batched
    with others. (Two ranks add their partial sums in either order to the same bits.)"""
    llm = LLM.load(checkpoint("llama"), dtype="float32", exact=True, tp=2)
    try:
        prefix = list(range(2, 70))
        prompts = [prefix + [100 + i, 101 + i] for i in range(4)]
        options = dict(max_new_tokens=6, temperature=0, ignore_eos=True, return_logits=True)
        cold = [llm.generate(p, use_prefix_cache=False, **options) for p in prompts]
        llm.generate(prefix + [7], **options)  # puts the prefix in the tree
        warm = llm.generate(prompts, **options)
        assert all(c.cached_tokens >= 64 for c in warm)
        for a, b in zip(cold, warm):
            assert a.token_ids == b.token_ids
            assert torch.equal(a.logits, b.logits)
        llm.engine.scheduler.check_invariants()
        llm.configure(exact_chunk=64)  # a new engine: a fresh pool on every rank
        assert llm.generate(prompts[0], **options).token_ids == cold[0].token_ids
    finally:
        llm.close()
    with pytest.raises(MinillmError, match="closed"):
        llm.generate(prompts[0], max_new_tokens=2)


def test_the_disk_tier_is_refused_under_tensor_parallelism(checkpoint, tmp_path):
    llm = LLM.load(checkpoint("llama"), dtype="float32", tp=2)
    try:
        with pytest.raises(MinillmError, match="disk tier"):
            llm.configure(cache_dir=tmp_path, kv_tokens=40)
        # refused before any rank changed its pool: the engine still runs, on slots past 40
        assert len(llm.generate(list(range(2, 90)), max_new_tokens=4, ignore_eos=True).token_ids) == 4
    finally:
        llm.close()


# -- processes launched as torchrun (or two machines) would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT -------


def _launch(folder: Path, new_tokens: int, extra: list[str] = ()) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            MINILLM_TP_TIMEOUT=str(TIMEOUT_S),
        )
        cmd = [
            sys.executable,
            "-m",
            "minillm",
            "generate",
            "--model",
            str(folder),
            "--dtype",
            "float32",
            "-n",
            str(new_tokens),
            "-t",
            "0",
            *extra,
            "The quick brown fox",
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _no_eos_checkpoint(checkpoint):
    """No end-of-sequence token, so a generation runs to its length whatever the random weights say."""
    return checkpoint("llama", eos_token_id=None, generation={"eos_token_id": None}, max_position_embeddings=2048)


def _wait_for_output(proc: subprocess.Popen, limit_s: float = 60) -> None:
    """Block until rank 0 has streamed its first bytes of text (it is then generating)."""
    deadline = time.monotonic() + limit_s
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        if proc.stdout.read(1):
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    raise AssertionError("rank 0 produced no text")


def _ends_with_one_line(proc: subprocess.Popen, within_s: float) -> str:
    try:
        proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running {within_s} s after the other rank was lost") from None
    err = proc.stderr.read().decode()
    assert proc.returncode not in (0, None), err
    errors = [line for line in err.splitlines() if line.startswith("minillm: error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_torchrun_style_launch_generates_what_one_process_does(checkpoint):
    folder = checkpoint("llama")
    procs = _launch(folder, 16, ["--json"])
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1].decode() + outs[1][1].decode()
    assert outs[1][0] == b""  # followers print nothing
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm",
            "generate",
            "--model",
            str(folder),
            "--dtype",
            "float32",
            "-n",
            "16",
            "-t",
            "0",
            "--json",
            "The quick brown fox",
        ],
        capture_output=True,
        timeout=120,
    )
    assert json.loads(outs[0][0])["token_ids"] == json.loads(single.stdout)["token_ids"]


@pytest.mark.parametrize("victim, how", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_a_lost_rank_ends_the_other_with_one_line(checkpoint, victim, how):
    """Killed (its connections close: the survivor fails at once) or hung (SIGSTOP: the survivor gives up at
    the timeout), mid-generation, either rank: the other exits non-zero with one line, no traceback."""
    procs = _launch(_no_eos_checkpoint(checkpoint), 1500)
    try:
        _wait_for_output(procs[0])
        os.kill(procs[victim].pid, how)
        line = _ends_with_one_line(procs[1 - victim], within_s=TIMEOUT_S + 20)
        assert "rank" in line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_the_server_on_two_ranks_answers_as_one_process_and_stops_its_follower(checkpoint):
    from test_server import Server, call

    folder = checkpoint("llama")
    expected = LLM.load(folder, dtype="float32").generate("The quick brown fox", max_new_tokens=8, temperature=0)
    server = Server(folder, "--tp", "2", "--dtype", "float32")
    try:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        assert len(children) == 1  # rank 1
        reply = call(
            "POST",
            f"{server.url}/v1/completions",
            {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected.text
    finally:
        assert server.stop() == 0, server.stderr
    assert not Path(f"/proc/{children[0]}").exists()  # told to stop, and waited for


def test_quantized_weights_split_too():
    """Each rank quantizes its own shard. int4's groups run along input channels, and a rank's columns are
    whole groups, so TP=2 int4 computes what TP=1 int4 does. int8 scales each output row over the rank's
    columns only (finer than over the whole row): its error from the float weights must stay as small."""
    ids = list(range(5, 60))
    exact = LLM.load(None, dtype="float32", prepack=False).logits(ids)
    for mode in ("int4", "int8"):
        one = LLM.load(None, dtype="float32", quantize=mode)
        two = LLM.load(None, dtype="float32", quantize=mode, tp=2)
        try:
            a, b = one.logits(ids), two.logits(ids)
            if mode == "int4":
                assert (a - b).abs().max() <= 1e-4
            else:
                assert (b - exact).abs().max() <= 1.25 * (a - exact).abs().max()
            assert two.model.weight_form == one.model.weight_form
        finally:
            two.close()


def test_the_cli_refuses_a_split_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "minillm", "generate", "--tp", "3", "hello"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--tp" in out.stderr, out.stderr
