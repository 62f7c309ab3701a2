"""The KV pool: decoding one token at a time through pooled KV must agree with recomputing the sequence."""

import pytest
import torch

from minillm.kv_pool import KVPool, kv_bytes_per_token


# Not dynamic NTK RoPE past its pretrained length: there the frequencies depend on the current length, so
# keys cached earlier were rotated differently from a recompute (transformers' cache behaves the same).
@pytest.mark.parametrize("family,options", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", dict(sliding_window=8)),
    ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16))),
])
def test_cached_decode_matches_full_recompute_every_step(load, family, options):
    llm = load(family, **options)
    llm.defaults.eos_token_ids = []
    ids = torch.randint(2, 300, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    out = llm.generate(ids, max_new_tokens=32, temperature=0, return_logits=True)
    full = llm.logits(ids + out.token_ids[:-1])[7:]  # the logits that chose each generated token
    torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=0)


def test_kv_memory_per_token(load):
    llm = load("llama")
    cfg = llm.config
    assert kv_bytes_per_token(cfg, torch.float32) == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    pool = KVPool(cfg, 11, torch.float32)
    assert pool.keys.shape == (cfg.num_layers, cfg.num_kv_heads, 11, cfg.head_dim)
    assert pool.bytes_per_token() == kv_bytes_per_token(cfg, torch.float32)
    assert pool.num_slots == pool.free_slots == 10  # slot 0 is the dump for padding rows


def test_alloc_and_free(load):
    pool = KVPool(load("llama").config, 6, torch.float32, poison_freed=True)
    a = pool.alloc(3)
    assert a.tolist() == [1, 2, 3]  # a fresh pool hands out slots in order
    assert pool.alloc(3) is None and pool.free_slots == 2  # too few: nothing taken
    pool.keys[:, :, a] = 1.0
    pool.free(a[1:])
    assert pool.free_slots == 4 and torch.isnan(pool.keys[:, :, a[1:]]).all() and (pool.keys[:, :, 1] == 1).all()
    assert sorted(pool.alloc(4).tolist()) == [2, 3, 4, 5]


def test_slots_are_int64_even_none_and_freed_kv_is_left_alone_unless_poisoning(load):
    """Slot tensors are concatenated with slot tables (int64): an empty allocation must be int64 too, or the
    concatenation turns the table into floats. Freeing writes nothing unless the debug poisoning is on."""
    pool = KVPool(load("llama").config, 6, torch.float32)
    assert pool.alloc(0).dtype == pool.alloc(2).dtype == torch.int64
    pool.keys[:, :, 1:3] = 1.0
    pool.values[:, :, 1:3] = 2.0
    pool.free(torch.tensor([1, 2]))
    assert (pool.keys[:, :, 1:3] == 1).all() and (pool.values[:, :, 1:3] == 2).all()
