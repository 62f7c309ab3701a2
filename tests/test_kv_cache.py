"""The KV cache: decoding one token at a time must agree with recomputing the whole sequence."""

import pytest
import torch

from minillm.kv_cache import KVCache


# Not dynamic NTK RoPE past its pretrained length: there the frequencies depend on the current length, so
# keys cached earlier were rotated differently from a recompute (transformers' cache behaves the same).
@pytest.mark.parametrize("family,options", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", dict(sliding_window=8)),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16))),
])
def test_cached_decode_matches_full_recompute_every_step(load, family, options):
    llm = load(family, **options)
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = KVCache(llm.config, 4, llm.dtype)  # deliberately small: reserve() must grow it
    llm.model(torch.tensor(ids[:8]), cache)
    for t in range(8, len(ids)):
        step = llm.model(torch.tensor([ids[t]]), cache)[0]
        full = llm.logits(ids[: t + 1])[-1]
        assert cache.length == t + 1
        torch.testing.assert_close(step.float(), full, atol=1e-5, rtol=0)


def test_kv_memory_per_token(load):
    llm = load("llama")
    cfg = llm.config
    cache = KVCache(cfg, 10, torch.float32)
    assert cache.bytes_per_token() == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert cache.keys.shape == (cfg.num_layers, cfg.num_kv_heads, 10, cfg.head_dim)
