"""Our model against transformers on the same random checkpoints: logits and greedy continuations.

With prepack=False (plain F.linear, as transformers) fp32 logits are bitwise equal. The default, prepacked
oneDNN weights on CPU (prepack.py), sums in another order: equal to a tolerance, same greedy tokens."""

import json

import pytest
import torch
from checkpoints import hf_model, make_checkpoint

from minillm import LLM
from minillm.loading import prepack
from minillm.loading.prepack import PackedLinear

# (family, checkpoint options): one per family, plus each config feature that changes the math.
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-dynamic-rope": (
        "llama",
        dict(max_position_embeddings=32, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)),
    ),
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "qwen3": ("qwen3", {}),
    "qwen3-yarn": (
        "qwen3",
        dict(
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)
        ),
    ),
    "mistral": ("mistral", {}),
    "mistral-sliding": ("mistral", dict(sliding_window=16)),
}


def prompt(n=48, seed=1):
    return torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def case_and_reference(case, checkpoint):
    """(checkpoint folder, prompt ids, transformers' fp32 logits [len, vocab]) for one of CASES."""
    family, options = CASES[case]
    folder = checkpoint(family, **options)
    ids = prompt()
    with torch.no_grad():
        return folder, ids, hf_model(folder)(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("case", CASES)
def test_fp32_logits_bitwise_equal_to_transformers(case, checkpoint):
    folder, ids, ref = case_and_reference(case, checkpoint)
    ours = LLM.load(folder, prepack=False).logits(ids)
    assert ours.shape == (len(ids), 320)
    assert (ours - ref).abs().max() <= 1e-5
    assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max():.3g}"


@pytest.mark.skipif(not prepack.available(torch.float32, "cpu"), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("case", CASES)
def test_prepacked_fp32_logits_close_to_transformers(case, checkpoint):
    folder, ids, ref = case_and_reference(case, checkpoint)
    llm = LLM.load(folder)
    assert isinstance(llm.model.lm_head, PackedLinear)
    assert llm.model.model.layers[0].self_attn.q_proj is None  # stacked into qkv_proj
    assert (llm.logits(ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_greedy_continuation_matches_transformers_generate(case, checkpoint):
    family, options = CASES[case]
    folder = checkpoint(family, **options)
    ids = prompt(20, seed=2)
    hf = hf_model(folder)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[0, len(ids) :].tolist()
    llm = LLM.load(folder)
    llm.defaults.eos_token_ids = []  # compare all 32 tokens; EOS handling has its own tests
    assert llm.generate(ids, max_new_tokens=32, temperature=0).token_ids == expected


def test_sharded_checkpoint(tmp_path):
    folder = make_checkpoint(tmp_path / "sharded", "llama", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    (folder / "consolidated.safetensors").write_bytes(b"decoy: not listed in the index, never read")
    ids = prompt()
    with torch.no_grad():
        ref = hf_model(folder)(torch.tensor([ids])).logits[0]
    assert torch.equal(LLM.load(folder, prepack=False).logits(ids), ref)
    assert (LLM.load(folder).logits(ids) - ref).abs().max() <= 1e-4


def test_transformers4_config_layout(checkpoint, tmp_path):
    """The same checkpoint with config.json rewritten the transformers 4 way gives the same logits."""
    folder = checkpoint("llama", rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=2.0))
    old = tmp_path / "v4"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), "factor": rope["factor"]}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (old / "config.json").unlink()
    (old / "config.json").write_text(json.dumps(config))
    ids = prompt()
    assert torch.equal(LLM.load(old).logits(ids), LLM.load(folder).logits(ids))
    assert LLM.load(old).config.rope.theta == 5000.0


def test_bf16_checkpoint_error_no_worse_than_transformers(checkpoint):
    folder = checkpoint("qwen3", dtype=torch.bfloat16)
    ids = prompt()
    with torch.no_grad():
        ref32 = hf_model(folder, torch.float32)(torch.tensor([ids])).logits[0].float()
        ref16 = hf_model(folder, torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    llm = LLM.load(folder)
    # dtype=None keeps the checkpoint's, except on a CPU without native bf16, which computes in float32
    assert llm.dtype == (torch.bfloat16 if prepack.available(torch.bfloat16, "cpu") else torch.float32)
    assert (llm.logits(ids) - ref32).abs().max() <= (ref16 - ref32).abs().max()
    assert torch.equal(LLM.load(folder, dtype="bfloat16", prepack=False).logits(ids), ref16)


def test_dtype_conversion_on_load(checkpoint):
    folder = checkpoint("llama")
    head = LLM.load(folder, dtype="bfloat16").model.lm_head  # packed for oneDNN, or kept for the compiled kernel
    assert (head.weight if isinstance(head, PackedLinear) else head.q).dtype == torch.bfloat16
    llm = LLM.load(folder, dtype="bfloat16", prepack=False)
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    ids = prompt()
    with torch.no_grad():
        ref16 = hf_model(folder, torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    assert torch.equal(llm.logits(ids), ref16)
