"""The model shipped in weights/: it loads by default, transformers agrees, and its output is pinned."""

import json
from pathlib import Path

import pytest
import torch
from checkpoints import hf_model

from minillm import LLM
from minillm.cli import main

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
PROMPT = "def fibonacci(n):"
# Greedy continuation recorded from this checkpoint; any change to the numerics shows up here.
GOLDEN_IDS = [
    266,
    385,
    51,
    458,
    272,
    694,
    386,
    291,
    694,
    386,
    291,
    694,
    386,
    291,
    694,
    386,
    291,
    266,
    652,
    14,
    331,
    593,
    783,
    322,
]
GOLDEN_TEXT = '\n    """Send a list of the list of the list of the list of the\n    string.\n\n    The result is'


@pytest.fixture(scope="module")
def bundled():
    return LLM.load()


def test_weights_are_small_and_complete():
    size = sum(f.stat().st_size for f in WEIGHTS.iterdir())
    assert size <= 25 * 2**20
    config = json.loads((WEIGHTS / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["tie_word_embeddings"]


def test_golden_greedy_continuation(bundled):
    out = bundled.generate(PROMPT, max_new_tokens=24, temperature=0, use_prefix_cache=False)
    assert out.token_ids == GOLDEN_IDS
    assert out.text == GOLDEN_TEXT


def test_transformers_loads_it_and_agrees(bundled):
    ids = bundled.tokenizer.encode("import os\n\ndef main(argv):\n    for name in os.listdir('.'):\n")
    with torch.no_grad():
        ref = hf_model(WEIGHTS)(torch.tensor([ids])).logits[0]
    assert torch.equal(LLM.load(prepack=False).logits(ids), ref)  # F.linear, as transformers: every bit
    assert (bundled.logits(ids) - ref).abs().max() <= 1e-4  # prepacked weights: another summation order


@pytest.mark.parametrize("flags", [[], ["--no-prepack"]], ids=["prepacked", "plain"])
def test_cli_uses_it_by_default(capsys, flags):
    assert main(["generate", "-n", "24", "-t", "0", "--no-prefix-cache", *flags, PROMPT]) == 0
    assert capsys.readouterr().out == GOLDEN_TEXT + "\n"
