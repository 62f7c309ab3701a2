"""Weight-only quantization (quantize.py): the kernels against a dequantized reference, quantized models
with the prefix cache, batching and exact mode, and bad settings refused in one line."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from minillm import LLM
from minillm.errors import MinillmError
from minillm.loading import prepack, quantize
from minillm.loading.quantize import QuantizedEmbedding, QuantizedLinear, dequantize, quantize_int4, quantize_int8

MODES = [("int8", 32), ("int4", 32), ("int4", 128)]


def reference(layer: QuantizedLinear, linear: nn.Linear) -> torch.Tensor:
    """The float32 matrix the quantized layer stands for, rebuilt from the quantization functions."""
    if layer.mode == "int8":
        return dequantize(*quantize_int8(linear.weight))
    return dequantize(*quantize_int4(linear.weight, layer.group_size), group_size=layer.group_size)


@pytest.mark.parametrize("mode,group", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_quantized_products_equal_the_dequantized_reference(mode, group, dtype, rows):
    """Tolerance: float32 products within 1e-5 of the largest output (only the summation order differs);
    bfloat16 ones within 1.5e-2 (the kernels round activations, scales and sums to bfloat16)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    layer = QuantizedLinear(linear, mode=mode, dtype=dtype, group_size=group)
    x = torch.randn(rows, 256)
    expected = x @ reference(layer, linear).T + linear.bias.detach()
    got = layer(x.to(dtype)).float()
    tolerance = (1e-5 if dtype == torch.float32 else 1.5e-2) * expected.abs().max()
    assert got.shape == (rows, 384) and (got - expected).abs().max() <= tolerance


@pytest.mark.parametrize("mode,group", MODES)
@pytest.mark.parametrize("out_features", [1152, 48])
def test_many_rows_take_the_dense_path_block_by_block(mode, group, out_features):
    """From DENSE_FROM_ROWS rows on, W is dequantized DENSE_BLOCK rows at a time and multiplied densely (1152
    rows: two blocks, the second partial); int4 layers whose rows are not whole 64-row blocks (48) keep the
    kernel. Both against the dequantized reference, bf16 tolerance as above."""
    torch.manual_seed(3)
    linear = nn.Linear(256, out_features)
    layer = QuantizedLinear(linear, mode=mode, dtype=torch.bfloat16, group_size=group)
    assert layer.dense == (
        prepack.available(torch.bfloat16, "cpu")
        and (mode == "int8" or (out_features % 64 == 0 and quantize.int4_layout_is_known()))
    )
    x = torch.randn(quantize.DENSE_FROM_ROWS + 8, 256)
    expected = x @ reference(layer, linear).T + linear.bias.detach()
    got = layer(x.bfloat16()).float()
    assert (got - expected).abs().max() <= 1.5e-2 * expected.abs().max()
    one_row = layer(x[:1].bfloat16()).float()  # the kernel: the same numbers, other roundings
    assert (one_row - got[:1]).abs().max() <= 1.5e-2 * expected.abs().max()


def test_unpack_int4_reads_the_packing_op():
    """unpack_int4 reads the packing op's layout back (the dense int4 path relies on it). The layout is the
    AVX-512 build's; elsewhere the check may say no, and int4 products then take the kernel."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("unpack_int4 reads the AVX-512 packing; on this CPU int4 products use the kernel")
    assert quantize.int4_layout_is_known()
    q = torch.randint(0, 16, (1152, 896), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(quantize.unpack_int4(packed, 896).to(torch.int32), q)
    assert torch.equal(quantize.unpack_int4(packed[64:192], 896).to(torch.int32), q[64:192])  # any whole blocks


@pytest.mark.parametrize("mode,group", MODES)
def test_quantization_error_is_at_most_half_a_step(mode, group):
    torch.manual_seed(1)
    w = torch.randn(96, 256) * torch.linspace(0.01, 3, 96)[:, None]  # rows of very different ranges
    if mode == "int8":
        q, scale = quantize_int8(w)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        step = scale[:, None]
        error = (dequantize(q, scale) - w).abs()
    else:
        q, scale, zero = quantize_int4(w, group)
        assert q.min() >= 0 and q.max() <= 15 and scale.shape == (96, 256 // group)
        step = scale.repeat_interleave(group, dim=1)
        error = (dequantize(q, scale, zero, group) - w).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert (error > 0).any()  # it does quantize


def test_stacked_parts_equal_separate_layers():
    """q, k and v (or gate and up) quantized as one stacked matrix give each part's own products."""
    torch.manual_seed(2)
    parts = [nn.Linear(128, n) for n in (128, 32, 32)]
    x = torch.randn(5, 128)
    for mode in ("int8", "int4"):
        stacked = QuantizedLinear(*parts, mode=mode, dtype=torch.float32).forward(x)
        alone = torch.cat([QuantizedLinear(p, mode=mode, dtype=torch.float32).forward(x) for p in parts], dim=1)
        assert (stacked - alone).abs().max() <= 1e-5 * alone.abs().max()


@pytest.mark.parametrize("mode,tied", [("int8", True), ("int8", False), ("int4", True), ("int4", False)])
def test_embedding_rows_come_from_the_tied_head_or_an_int8_table(checkpoint, mode, tied):
    """A lookup gives the dequantized rows of the checkpoint's table. Tied to an int8 head, the table is the
    head's own int8 matrix; tied to an int4 head, rows are gathered from its packed layout (where unpack_int4
    reads this CPU's packing); an untied table is quantized on its own, int8 per row."""
    folder = checkpoint("qwen2", tie_word_embeddings=tied)
    plain = LLM.load(folder, dtype="float32", prepack=False).model
    model = LLM.load(folder, dtype="float32", quantize=mode).model
    embed, head = model.model.embed_tokens, model.lm_head
    table = plain.model.embed_tokens.weight.detach()
    tokens = torch.tensor([0, 5, 5, 17, 31, 32, 63, 64, 100, plain.config.vocab_size - 1])
    from_head = tied and (mode == "int8" or quantize.int4_layout_is_known())
    assert (embed.q.data_ptr() == head.q.data_ptr()) == from_head  # one copy of that matrix, not two
    if from_head and mode == "int4":
        assert isinstance(embed, quantize.Int4HeadEmbedding)
        expected = dequantize(*quantize_int4(table, head.group_size), group_size=head.group_size)[tokens]
        assert (embed(tokens) - expected).abs().max() <= 1e-6 * expected.abs().max()  # the same formula
    else:
        assert isinstance(embed, QuantizedEmbedding) and embed.q.dtype == torch.int8
        assert torch.equal(embed(tokens), dequantize(*quantize_int8(table))[tokens])
    assert all(p.dim() == 1 for p in model.parameters())  # norms only: no float matrix (the table) is left


def test_quantized_buffers_hold_no_autograd_history(checkpoint):
    """The checkpoint's parameters require grad; quantizing them without detaching once kept every temporary
    of the quantization alive through the buffers' autograd graph (resident memory 3.5x the weights)."""
    model = LLM.load(checkpoint("llama"), dtype="bfloat16", quantize="int8").model
    assert all(b.grad_fn is None and not b.requires_grad for b in model.buffers())


@pytest.fixture(scope="module")
def bundled_float32():
    return LLM.load(dtype="float32")


@pytest.mark.parametrize("mode,worst,agree", [("int8", 0.05, 0.97), ("int4", 0.6, 0.8)])
def test_quantized_bundled_model_stays_close_to_float32(bundled_float32, mode, worst, agree):
    """On the bundled model's own kind of text: logits within `worst` of float32's (relative to their
    spread), and the same next token at least `agree` of the time. (tools/bench_quality.py measures
    the held-out loss itself.)"""
    quantized = LLM.load(dtype="float32", quantize=mode)
    assert quantized.model.weight_form == ("int8" if mode == "int8" else "int4-g32")
    ids = quantized.tokenizer.encode(
        "import os\nimport sys\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
    )
    full, low = bundled_float32.logits(ids), quantized.logits(ids)
    assert (low - full).abs().max() <= worst * (full.max() - full.min())
    assert (low.argmax(-1) == full.argmax(-1)).float().mean() >= agree


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_batching_and_exact_mode_on_quantized_models(mode, dtype):
    llm = LLM.load(dtype=dtype, quantize=mode)
    llm.defaults.eos_token_ids = []
    text = "import os\nimport sys\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
    doc = llm.tokenizer.encode(text * 8)
    prompts = [doc + llm.tokenizer.encode(q) for q in ("        print(name)\n", "    return 0\n", "class A:\n")]
    cold = [llm.generate(p, max_new_tokens=8, temperature=0, use_prefix_cache=False).token_ids for p in prompts]
    batched = llm.generate(prompts, max_new_tokens=8, temperature=0)
    assert [c.token_ids for c in batched] == cold and sum(c.cached_tokens for c in batched) > 0
    exact = LLM.load(dtype=dtype, quantize=mode, exact=True)
    exact.defaults.eos_token_ids = []
    exact.generate(doc[:133] + [7, 8, 9], max_new_tokens=2)  # caches two whole 64-token chunks
    warm = exact.generate(doc, max_new_tokens=4, use_prefix_cache=True, return_logits=True, temperature=0)
    uncached = exact.generate(doc, max_new_tokens=4, use_prefix_cache=False, return_logits=True, temperature=0)
    assert len(doc) > 3 * 64 and warm.cached_tokens == 128
    assert torch.equal(warm.logits, uncached.logits) and warm.token_ids == uncached.token_ids


def test_the_disk_tier_keeps_quantized_kv_apart(checkpoint, tmp_path):
    folder = checkpoint("llama")
    prompt = list(range(2, 140))
    plain = LLM.load(folder, cache_dir=tmp_path)
    plain.generate(prompt, max_new_tokens=2)
    plain.close()
    int8 = LLM.load(folder, quantize="int8", cache_dir=tmp_path)
    assert int8.generate(prompt, max_new_tokens=2).cached_tokens == 0  # a plain model's KV is not int8's
    int8.close()
    again = LLM.load(folder, quantize="int8", cache_dir=tmp_path)
    assert again.generate(prompt, max_new_tokens=2).cached_tokens == 128
    again.close()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(quantize="int3"), "unknown quantize mode 'int3'; choose int8 or int4"),
        (dict(quantize="int4", group_size=48), "int4 group size must be one of 32, 64, 128, 256, got 48"),
        (
            dict(quantize="int4", group_size=256),
            "int4 group size 256 does not divide the model's hidden size (64); choose 32 or 64",
        ),
        (
            dict(quantize="int8", prepack=True),
            "quantized weights use their own kernels, not prepacked ones; drop prepack",
        ),
        (dict(quantize="int8", dtype="float16"), "quantized products compute in float32 or bfloat16"),
    ],
)
def test_bad_quantize_settings_are_one_line_errors(checkpoint, options, message):
    with pytest.raises(MinillmError) as error:
        LLM.load(checkpoint("llama"), **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_int4_refuses_a_vocabulary_its_packing_cannot_hold(checkpoint):
    folder = checkpoint("llama", vocab_size=1000 + 4)  # the kernel packs output rows in blocks of 16
    with pytest.raises(MinillmError) as error:
        LLM.load(folder, quantize="int4")
    assert "vocabulary (1004 rows here) is not a multiple of 16; use int8" in str(error.value)
    assert LLM.load(folder, quantize="int8").generate([5, 6], max_new_tokens=2).token_ids  # int8 has no such limit


def test_cli_quantize_runs_and_refuses_a_bad_group_size(checkpoint):
    folder = str(checkpoint("llama"))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm",
            "generate",
            "--model",
            folder,
            "--quantize",
            "int4",
            "-n",
            "4",
            "--temperature",
            "0",
            "Hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "tok/s" in ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm",
            "generate",
            "--model",
            folder,
            "--quantize",
            "int4",
            "--group-size",
            "100",
            "Hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "minillm: error: int4 group size must be one of 32, 64, 128, 256, got 100"
