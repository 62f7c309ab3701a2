"""tools/train_tiny.py: a 2-step run on a toy config writes a checkpoint both engines load alike."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from checkpoints import hf_model

from minillm import LLM

ROOT = Path(__file__).resolve().parents[1]


def test_two_training_steps_write_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "toy"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_tiny.py"), "--toy", "--steps", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stderr and "loss" in result.stderr  # the progress bar
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "training_report.json",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 2 and report["held_out_loss_nats_per_token"] > 0
    llm = LLM.load(out)
    assert llm.config.architecture == "LlamaForCausalLM" and llm.config.tie_word_embeddings
    assert llm.config.num_kv_heads < llm.config.num_heads  # GQA
    ids = llm.tokenizer.encode("def main():\n    return 0\n")
    with torch.no_grad():
        ref = hf_model(out, torch.float32)(torch.tensor([ids])).logits[0]
    assert torch.equal(LLM.load(out, dtype="float32", prepack=False).logits(ids), ref)  # plain: transformers' bits
    assert llm.generate("import os", max_new_tokens=4, temperature=0).finish_reason in ("stop", "length")
    # The reported held-out loss is the saved checkpoint's (e.g. no weight trained but not shipped).
    sys.path.insert(0, str(ROOT / "tools"))
    import train_tiny

    _, held = train_tiny.split_corpus(train_tiny.corpus_files(limit=40))
    held_ids = train_tiny.encode_all(llm.tokenizer.backend, train_tiny.read_texts(held))
    loss = train_tiny.evaluate(llm.model, held_ids, report["hyperparameters"]["seq_len"])
    assert abs(loss - report["held_out_loss_nats_per_token"]) < 1e-3
