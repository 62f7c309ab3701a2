"""The KV pool: decoding one token at a time through pooled KV must agree with recomputing the sequence."""

import pytest
import torch

from minillm.cache.kv_pool import KVPool, kv_bytes_per_token


# Not dynamic NTK RoPE past its pretrained length: there the frequencies depend on the current length, so
# keys cached earlier were rotated differently from a recompute (transformers' cache behaves the same).
@pytest.mark.parametrize(
    "family,options",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("mistral", dict(sliding_window=8)),
        (
            "llama",
            dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=5e5,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                )
            ),
        ),
    ],
)
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
    assert pool.slot_bytes() == kv_bytes_per_token(cfg, torch.float32)
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


def test_dynamic_rope_rows_of_different_lengths_in_one_forward_get_their_own_frequencies(load):
    """Dynamic NTK scaling derives its frequencies from the sequence's length: two prompts past the pretrained
    length, prefilled in the same forward, each get the logits they get alone."""
    llm = load(
        "llama", max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0)
    )
    prompts = [list(range(2, 40)), list(range(50, 72))]
    options = dict(max_new_tokens=1, temperature=0, return_logits=True)
    alone = [llm.generate(p, **options).logits for p in prompts]
    handles = [llm.submit(p, **options) for p in prompts]
    llm.engine.step()  # both prompts in one forward
    for handle, logits in zip(handles, alone):
        torch.testing.assert_close(handle.result().logits, logits, atol=1e-5, rtol=0)


def test_a_lone_requests_consecutive_slots_are_written_and_read_in_place(load):
    """Consecutive slots (a lone request on a fresh pool) are written with one copy and attended through a view
    of the pool; scattered slots, or views=False (exact mode), go through index_copy / index_select."""
    from minillm.engine.forward_batch import ForwardBatch
    from minillm.engine.plan import Segment

    pool = KVPool(load("llama").config, 20, torch.float32)
    run = Segment([5, 6, 7], 0, torch.tensor([4, 5, 6]))
    scattered = Segment([5, 6], 1, torch.tensor([9, 3, 8]))
    batch = ForwardBatch(pool, [run], "cpu", views=True)
    assert batch.write_run == (4, 3) and batch.runs == [(4, 3)]
    batch = ForwardBatch(pool, [run, scattered], "cpu", views=True)
    assert batch.write_run is None and batch.runs == [(4, 3), None]
    assert batch.write_slots.tolist() == [4, 5, 6, 3, 8] and batch.lengths.tolist() == [3, 3, 3, 3, 3]
    assert ForwardBatch(pool, [run], "cpu", views=False).runs == [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_rows_attend_in_the_pool_as_the_gathered_path_does(load, dtype, window):
    """Rows of short segments (a decode token, a verified draft's few rows) attend through
    kernels/compiled.decode_attention, each row over its own sequence's slots up to its position, read where
    they lie; rows of a long prompt chunk in the same forward keep gather + SDPA. Both must give what the
    gathered path (views=False, exact mode's) gives, sliding window included: a row sees its last `window`
    keys."""
    from minillm.engine.forward_batch import IN_POOL_ROWS, ForwardBatch
    from minillm.engine.plan import Segment
    from minillm.kernels import compiled

    if not compiled.available():
        pytest.skip(f"the compiled kernels do not run here: {compiled.unavailable_reason()}")
    config = load("llama").config
    pool = KVPool(config, 96, dtype)
    torch.manual_seed(4)
    pool.keys.copy_(torch.randn_like(pool.keys, dtype=torch.float32))
    pool.values.copy_(torch.randn_like(pool.values, dtype=torch.float32))
    slots = torch.randperm(90)[:60] + 1  # slot 0 is reserved
    segments = [
        Segment([7], 9, slots[:10]),  # decode rows of three sequences around a draft and a prompt chunk
        Segment([3, 4, 5], 6, slots[10:19]),  # a token and a draft of two: in the pool, causal
        Segment([8], 12, slots[19:32]),
        Segment([9], 0, slots[32:33]),  # a first token alone: one key
        Segment(list(range(20, 20 + IN_POOL_ROWS + 2)), 3, slots[33 : 36 + IN_POOL_ROWS + 2]),  # a prompt chunk
    ]
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    rows = sum(len(s.tokens) for s in segments)
    q = torch.randn(heads, rows, dim).to(dtype)
    keys, values = torch.randn(kv_heads, rows, dim).to(dtype), torch.randn(kv_heads, rows, dim).to(dtype)
    fast = ForwardBatch(pool, segments, "cpu", views=True)
    assert fast.decode == [0, 1, 2, 3] and fast.gathered == [4]
    got = fast.attend(0, window, q, keys, values)
    expected = ForwardBatch(pool, segments, "cpu", views=False).attend(0, window, q, keys, values)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    decode_only = [segments[0], segments[2]]
    got = ForwardBatch(pool, decode_only, "cpu", views=True).attend(1, window, q[:, :2], keys[:, :2], values[:, :2])
    expected = ForwardBatch(pool, decode_only, "cpu", views=False).attend(
        1, window, q[:, :2], keys[:, :2], values[:, :2]
    )
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_read_and_write_move_exactly_the_named_slots(load):
    """write puts [layers, kv_heads, n, head_dim] keys and values in n slots, in order, and touches no other
    slot; read gives copies of exactly what is there; slot_bytes measures one slot's keys and values."""
    config = load("llama").config
    pool = KVPool(config, 9, torch.bfloat16)
    layers, kv_heads, _, head_dim = pool.keys.shape
    keys = torch.randn(layers, kv_heads, 3, head_dim).bfloat16()
    values = torch.randn(layers, kv_heads, 3, head_dim).bfloat16()
    pool.keys.fill_(3.0)  # the buffers start uninitialized (maybe NaN, which equals nothing)
    pool.values.fill_(-3.0)
    before_keys, before_values = pool.keys.clone(), pool.values.clone()
    slots = torch.tensor([7, 2, 5])
    pool.write(slots, keys, values)
    got_keys, got_values = pool.read(slots)
    assert got_keys.dtype == torch.bfloat16 and got_keys.shape == (layers, kv_heads, 3, head_dim)
    torch.testing.assert_close(got_keys, keys, atol=0, rtol=0)
    torch.testing.assert_close(got_values, values, atol=0, rtol=0)
    torch.testing.assert_close(pool.values[:, :, 2], values[:, :, 1], atol=0, rtol=0)  # slot 2 = 2nd
    others = [s for s in range(9) if s not in (7, 2, 5)]
    assert torch.equal(pool.keys[:, :, others], before_keys[:, :, others])
    assert torch.equal(pool.values[:, :, others], before_values[:, :, others])
    got_keys[:] = 0  # a copy: the pool keeps its keys
    assert torch.equal(pool.read(slots)[0], keys)
    assert pool.slot_bytes() == 2 * layers * kv_heads * head_dim * 2 == kv_bytes_per_token(config, torch.bfloat16)
