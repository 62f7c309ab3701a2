"""python -m minillm perplexity (perplexity.py): windows score every token once, the figures are what the logits
say, and KL divergence against a saved run is zero for the same run and positive for a quantized one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import LLM
from minillm.errors import MinillmError
from minillm.perplexity import Windows, score

TEXT = (
    "The prefix cache keeps the keys and values of every prompt it has seen, so that a second request that "
    "shares the first one's opening computes only what is new. The scheduler admits the longest match first. "
) * 6


@given(st.integers(2, 300), st.integers(2, 64), st.data())
@settings(max_examples=200, deadline=None)
def test_windows_score_every_token_once_with_enough_context(num_tokens, context, data):
    stride = data.draw(st.integers(1, context - 1))
    scored = []
    for begin, first, end in Windows.over(num_tokens, context, stride).spans:
        assert end - begin <= context and begin < first <= end
        if begin > 0:
            assert first - begin >= context - stride  # every scored token sees at least context - stride before it
        scored.extend(range(first, end))
    assert scored == list(range(1, num_tokens))


@pytest.fixture(scope="module")
def bundled():
    return LLM.load(prepack=False)


def test_one_window_is_the_mean_nll_of_one_forward(bundled):
    ids = bundled.tokenizer.encode(TEXT)
    logits = bundled.logits(ids).double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    scores = score(bundled, TEXT, context=len(ids), stride=len(ids) - 1)
    assert torch.allclose(scores.nll, nll, rtol=0, atol=1e-9)
    ppl, err = scores.perplexity
    assert ppl == pytest.approx(math.exp(nll.mean().item()))
    assert err == pytest.approx(ppl * nll.std().item() / math.sqrt(len(nll)))


def test_kl_against_itself_is_zero_and_against_int8_is_not(bundled, tmp_path):
    saved = tmp_path / "base.safetensors"
    base = score(bundled, TEXT, context=64, stride=32, save=saved).summary()
    same = score(bundled, TEXT, context=64, stride=32, base=saved).summary()
    assert same["perplexity"] == base["perplexity"]
    assert 0 <= same["kl_mean"] < 1e-6 and same["top1_same"] == 1.0  # float16 storage of the reference
    quantized = score(LLM.load(quantize="int4"), TEXT, context=64, stride=32, base=saved).summary()
    assert quantized["kl_mean"] > 10 * same["kl_mean"] and quantized["kl_p99"] >= quantized["kl_mean"]
    with pytest.raises(MinillmError, match="another text"):
        score(bundled, TEXT + " more", context=64, stride=32, base=saved)


def test_cli_prints_figures_and_refuses_bad_windows(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = [sys.executable, "-m", "minillm", "perplexity", str(text), "--no-prepack"]
    done = subprocess.run([*run, "--context", "64", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["stride"] == 32 and figures["tokens_scored"] > 0 and figures["perplexity"] > 1
    bad = subprocess.run([*run, "--context", "64", "--stride", "64"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--stride must be between 1 and --context - 1 (63), got 64" in bad.stderr
    assert "Traceback" not in bad.stderr
