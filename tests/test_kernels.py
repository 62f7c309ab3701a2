"""The compiled kernels (kernels/matmul.cpp) called directly, and the float32 layers that use one of them
(prepack.PackedLinear). quantize.py's forms are tested through their layers in
test_quantize.py; here: lengths that are not whole blocks, shapes refused, rows independent of each other."""

import os
import time

import pytest
import torch
from torch import nn

from minillm.kernels import compiled
from minillm.loading import quantize
from minillm.loading.prepack import PackedLinear


@pytest.fixture(autouse=True)
def kernels():
    if not compiled.available():
        pytest.skip(f"the compiled kernels do not run here: {compiled.unavailable_reason()}")


@pytest.mark.parametrize("in_features", [32, 37, 896])  # 37: a tail of 5 after one step of 32
@pytest.mark.parametrize("rows", [1, 3])
def test_float_kernels_equal_a_float32_product(in_features, rows):
    torch.manual_seed(0)
    w, x = torch.randn(200, in_features), torch.randn(rows, in_features)
    wb = w.bfloat16()
    reference = x.bfloat16().float() @ wb.float().T
    for got, expected, tolerance in [
        (compiled.linear_f32(x, compiled.pack_f32(w), 200), x @ w.T, 1e-5),  # float32: only the summation order differs
        (compiled.linear_bf16(x, wb), x @ wb.float().T, 1e-5),  # bf16 weights widened exactly
        (compiled.linear_bf16(x.bfloat16(), wb), reference, 1e-2),  # bf16 activations, result rounded to bf16
    ]:
        assert got.shape == expected.shape
        assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


def needs_width(width: int) -> None:
    if width == 512 and "avx512f" not in compiled.cpu_flags():
        pytest.skip("this CPU has no AVX-512: only linear_f32's AVX2 variant runs here")


@pytest.mark.parametrize("width", [256, 512])
@pytest.mark.parametrize("in_features", [37, 300, 896, 1100])  # 1100: a panel of 1,024 and a short one
def test_float32_kernel_gives_each_row_the_same_bits_in_any_batch(in_features, width):
    """linear_f32 takes two blocks of 16 output channels at a time for up to 2 rows (AVX-512: for any number),
    one block for more, the rows in groups of up to 6 (AVX-512: 12) that go through a block in panels once
    there are several groups, and above 512 rows 512 at a time; 203 outputs end in a block of 11. Every output
    must still be one chain of multiply-adds in input order, so a row of x gets the same bits alone or in any
    batch, in any group."""
    needs_width(width)
    torch.manual_seed(3)
    w, x = torch.randn(203, in_features), torch.randn(30, in_features)
    packed = compiled.pack_f32(w)
    assert packed.shape == (13, in_features, 16) and torch.equal(packed[12, :, 11:], torch.zeros(in_features, 5))
    alone = torch.cat([compiled.linear_f32(x[i : i + 1], packed, 203, width) for i in range(len(x))])
    assert (alone - x @ w.T).abs().max() <= 1e-5 * (x @ w.T).abs().max()
    for first, count in [(0, 2), (0, 3), (0, 4), (1, 5), (0, 6), (2, 7), (0, 9), (0, 12), (1, 13), (0, 25), (0, 30)]:
        got = compiled.linear_f32(x[first : first + count], packed, 203, width)
        assert torch.equal(got, alone[first : first + count])
    many = torch.cat([torch.randn(520, in_features), x])  # a pass of 512 rows, then 38 with x's 30
    assert torch.equal(compiled.linear_f32(many, packed, 203, width)[-30:], alone)


@pytest.mark.parametrize("out", [203, 213])  # the last work item of 2 blocks: a part-block alone, or after a whole
def test_float32_kernel_gives_the_same_bits_with_avx2_and_avx512(out):
    """The AVX-512 variant (16-lane registers, groups of 12 rows) runs each output's chain of multiply-adds in the
    same order as the AVX2 one, so which one a CPU takes by default changes no result."""
    needs_width(512)
    torch.manual_seed(4)
    w = torch.randn(out, 1100)
    packed = compiled.pack_f32(w)
    for rows in (1, 2, 3, 8, 12, 13, 25, 600):
        x = torch.randn(rows, 1100)
        assert torch.equal(compiled.linear_f32(x, packed, out, 256), compiled.linear_f32(x, packed, out, 512))
        assert torch.equal(compiled.linear_f32(x, packed, out), compiled.linear_f32(x, packed, out, 256))


@pytest.mark.parametrize("in_features,group", [(416, 32), (896, 32), (896, 128), (448, 64)])
def test_int4_kernel_covers_blocks_in_pairs_and_the_rest_alone(in_features, group):
    """linear_q4_1 takes 8 blocks at a time as pairs and the remaining blocks one by one (416 = 13 blocks:
    8 paired, 5 alone; 896 = 28: 24 and 4); against the dequantized reference on the same quantized x."""
    torch.manual_seed(2)
    w, x = torch.randn(300, in_features), torch.randn(2, in_features)
    q, d, m = quantize.quantize_int4(w, group)
    expected = quantize.quantize_activations(x) @ quantize.dequantize(q, d, m).T
    got = compiled.linear_q4_1(x, q, d, m)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (4, 4, 32), (8, 2, 128), (6, 3, 8), (4, 2, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_in_the_pool_equals_gathered_attention(heads, kv_heads, head_dim, dtype):
    """Sequences of 1 to 1,100 keys in scattered slots, the last two sharing a prefix of 300 (the kernel takes
    rows in order of their first slot, not in row order): the same attention as gathering them and running the
    model's own attend (softmax in float32 both ways; bf16 KV widened exactly, the result rounded once).
    head_dim 96: the values go 64 dimensions at a time, then the rest 8 at a time."""
    from minillm.model.model import attend

    torch.manual_seed(5)
    keys, values = torch.randn(kv_heads, 3000, head_dim).to(dtype), torch.randn(kv_heads, 3000, head_dim).to(dtype)
    lengths = [1, 7, 9, 300, 1100, 310]
    slots = [torch.randperm(3000)[:n] for n in lengths]
    slots[5] = torch.cat([slots[3], slots[5][:10]])  # row 5: row 3's slots and 10 of its own
    q = torch.randn(heads, len(lengths), head_dim).to(dtype)
    starts = torch.tensor([0] + lengths).cumsum(0)
    got = compiled.decode_attention(q, keys, values, torch.cat(slots), starts)
    expected = torch.cat(
        [
            attend(
                q[:, i : i + 1].float(), keys.index_select(1, s).float(), values.index_select(1, s).float(), None, False
            )
            for i, s in enumerate(slots)
        ]
    )
    assert got.dtype == dtype and got.shape == (len(lengths), heads * head_dim)
    torch.testing.assert_close(got.float(), expected, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    with pytest.raises(RuntimeError, match="slot out of range"):
        compiled.decode_attention(q[:, :1], keys, values, torch.tensor([3000]), torch.tensor([0, 1]))


def test_bad_shapes_are_refused_with_the_reason():
    q, d = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 64\]"):
        compiled.linear_q8_0(torch.zeros(1, 32), q, d)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        compiled.linear_q8_0(torch.zeros(1, 48), torch.zeros(4, 48, dtype=torch.int8), d)
    with pytest.raises(RuntimeError, match="must be packed"):
        compiled.linear_f32(torch.zeros(1, 64), torch.zeros(4, 64), 4)
    with pytest.raises(RuntimeError, match="out does not match"):
        compiled.linear_f32(torch.zeros(1, 64), torch.zeros(1, 64, 16), 20)
    with pytest.raises(RuntimeError, match="float32"):
        compiled.linear_f32(torch.zeros(1, 64), torch.zeros(1, 64, 16, dtype=torch.float64), 16)
    with pytest.raises(RuntimeError, match="width must be 0, 256 or 512"):
        compiled.linear_f32(torch.zeros(1, 64), torch.zeros(1, 64, 16), 16, 128)


def test_float32_packed_layers_take_the_kernel_for_every_number_of_rows():
    """Where the kernels run, a float32 PackedLinear holds its stacked weights packed for linear_f32 and every
    product takes it, decode rows and prompt chunks alike: equal to F.linear to rounding, each row's bits
    independent of the other rows."""
    torch.manual_seed(1)
    parts = [nn.Linear(96, 64), nn.Linear(96, 40)]
    layer = PackedLinear(*parts, dtype=torch.float32, onednn=False)
    assert layer.kernel and layer.weight.shape == (7, 96, 16)
    weight = torch.cat([p.weight for p in parts]).detach()
    bias = torch.cat([p.bias for p in parts]).detach()
    x = torch.randn(40, 96)
    expected = x @ weight.T + bias
    for rows in (1, 2, 5, 31, 40):
        assert (layer(x[:rows]) - expected[:rows]).abs().max() <= 1e-5 * expected.abs().max()
    together = layer(x)
    assert all(torch.equal(layer(x[i : i + 1]), together[i : i + 1]) for i in range(len(x)))
    assert layer(torch.randn(2, 3, 96)).shape == (2, 3, 104)  # leading dimensions kept


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """torch's builder waits forever for another build's lock file; one left by an interrupted build (older
    than any build takes) is removed, a fresh one (a build running now) is left alone."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = time.time() - compiled.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    compiled.clear_stale_lock(stale)
    compiled.clear_stale_lock(fresh)
    compiled.clear_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()
