"""Compact weights (quantize.py) and their kernels (kernels/): every product path against a dequantized
reference, rows independent of each other and of the threads, quantized models with the prefix cache,
batching and exact mode, the bf16 form on CPUs without native bf16, and bad settings refused in one line."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from minillm import LLM
from minillm.errors import MinillmError
from minillm.kernels import compiled
from minillm.loading import prepack, quantize
from minillm.loading.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize,
    pack_nibbles,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

MODES = [("int8", 32), ("int4", 32), ("int4", 128), ("bf16", 32)]
KERNEL_PATHS = [
    pytest.param(True, id="kernel"),  # where the CPU has it (else skipped, saying why)
    pytest.param(False, id="fallback"),  # PyTorch's path, as on a machine without the kernels
]


def reference(layer: QuantizedLinear, linear: nn.Linear) -> torch.Tensor:
    """The float32 matrix the layer stands for, rebuilt from the quantization functions."""
    if layer.mode == "int8":
        return dequantize(*quantize_int8(linear.weight))
    if layer.mode == "int4":
        return dequantize(*quantize_int4(linear.weight, layer.group_size))
    return linear.weight.detach().bfloat16().float()


def use_path(layer: QuantizedLinear, kernel: bool) -> QuantizedLinear:
    if kernel and not compiled.available():
        pytest.skip(f"the compiled kernels do not run here: {compiled.unavailable_reason()}")
    layer.kernel = kernel
    return layer


@pytest.mark.parametrize("kernel", KERNEL_PATHS)
@pytest.mark.parametrize("mode,group", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_products_equal_the_dequantized_reference(kernel, mode, group, dtype, rows):
    """Below DENSE_FROM_ROWS rows, int8 and int4 quantize the activations per block of 32 (so the reference
    does too); from it on, W is dequantized a block of rows at a time. Tolerance: float32 products within
    1e-5 of the largest output (only the summation order differs); bf16 ones within 1.5e-2 (activations and
    outputs rounded to bf16)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 1152 if rows == 64 else 384)  # 1152 rows: two dense blocks, the second partial
    layer = use_path(QuantizedLinear(linear, mode=mode, dtype=dtype, group_size=group), kernel)
    x = torch.randn(rows, 256).to(dtype).float()
    if rows < quantize.DENSE_FROM_ROWS and mode != "bf16":
        x = quantize_activations(x)
    expected = x @ reference(layer, linear).T + linear.bias.detach()
    got = layer(x.to(dtype)).float()
    tolerance = (1e-5 if dtype == torch.float32 else 1.5e-2) * expected.abs().max()
    assert got.shape == expected.shape and (got - expected).abs().max() <= tolerance


@pytest.mark.parametrize("mode,group", MODES)
def test_a_rows_result_depends_on_nothing_but_that_row(mode, group):
    """Exact mode's requirement of the kernels: a row's output is the same bits alone, among other rows, and
    on one thread or two (the threads split the output columns, never a sum)."""
    torch.manual_seed(4)
    layer = use_path(QuantizedLinear(nn.Linear(512, 640), mode=mode, dtype=torch.float32, group_size=group), True)
    x = torch.randn(9, 512)
    together = layer(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, one_thread)
    for i in (0, 4, 8):
        assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])


def test_activations_round_as_the_kernels_round():
    """quantize_activations (the fallback's) and the kernels quantize x alike: against an identity-like int8
    weight of ones, a product is a sum of x's quantized values, equal on both paths to float32 rounding."""
    if not compiled.available():
        pytest.skip(f"the compiled kernels do not run here: {compiled.unavailable_reason()}")
    torch.manual_seed(5)
    x = torch.randn(3, 64) * torch.logspace(-3, 2, 64)  # blocks of very different ranges
    q, d = torch.ones(1, 64, dtype=torch.int8), torch.ones(1, 2, dtype=torch.float16)
    expected = quantize_activations(x).sum(dim=1, keepdim=True)
    assert torch.allclose(compiled.linear_q8_0(x, q, d), expected, rtol=1e-6, atol=1e-6)


def test_nibbles_pack_as_gguf_orders_them():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64).flip(1).contiguous()
    packed = pack_nibbles(q)
    assert packed.shape == (1, 32) and torch.equal(unpack_nibbles(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4)  # value i low in byte i, value i + 16 high


@pytest.mark.parametrize("mode,group", MODES[:3])
def test_quantization_error_is_at_most_half_a_step(mode, group):
    torch.manual_seed(1)
    w = torch.randn(96, 256) * torch.linspace(0.01, 3, 96)[:, None]  # rows of very different ranges
    if mode == "int8":
        q, d = quantize_int8(w)
        assert q.dtype == torch.int8 and q.abs().max() <= 127 and d.shape == (96, 8) and d.dtype == torch.float16
        error = (dequantize(q, d) - w).abs()
        step = d.float().repeat_interleave(32, dim=1)
    else:
        q, d, m = quantize_int4(w, group)
        assert q.shape == (96, 128) and d.shape == m.shape == (96, 256 // group)
        assert unpack_nibbles(q).max() <= 15
        error = (dequantize(q, d, m) - w).abs()
        step = d.float().repeat_interleave(group, dim=1)
    assert (error <= step / 2 * 1.01 + 1e-6).all()  # 1%: the scales are rounded to float16
    assert (error > 0).any()  # it does quantize


def test_stacked_parts_equal_separate_layers():
    """q, k and v (or gate and up) quantized as one stacked matrix give each part's own products."""
    torch.manual_seed(2)
    parts = [nn.Linear(128, n) for n in (128, 32, 32)]
    x = torch.randn(5, 128)
    for mode in ("int8", "int4", "bf16"):
        stacked = QuantizedLinear(*parts, mode=mode, dtype=torch.float32).forward(x)
        alone = torch.cat([QuantizedLinear(p, mode=mode, dtype=torch.float32).forward(x) for p in parts], dim=1)
        assert (stacked - alone).abs().max() <= 1e-5 * alone.abs().max()


@pytest.mark.parametrize("mode,tied", [("int8", True), ("int8", False), ("int4", True), ("int4", False)])
def test_embedding_rows_come_from_the_tied_head_or_an_int8_table(checkpoint, mode, tied):
    """A lookup gives the dequantized rows of the checkpoint's table: tied, read from the quantized head
    itself (one copy of that matrix); untied, from an int8 table of its own. int4 keeps the head int8."""
    folder = checkpoint("qwen2", tie_word_embeddings=tied)
    plain = LLM.load(folder, dtype="float32", prepack=False).model
    model = LLM.load(folder, dtype="float32", quantize=mode).model
    embed, head = model.model.embed_tokens, model.lm_head
    table = plain.model.embed_tokens.weight.detach()
    tokens = torch.tensor([0, 5, 5, 17, 31, 32, 63, 64, 100, plain.config.vocab_size - 1])
    assert isinstance(embed, QuantizedEmbedding) and (embed.table is head) == tied
    assert head.mode == "int8" and model.model.layers[0].mlp.down_proj.mode == mode
    assert torch.equal(embed(tokens), dequantize(*quantize_int8(table))[tokens])
    assert all(p.dim() == 1 for p in model.parameters())  # norms only: no float matrix (the table) is left


def test_a_bf16_checkpoint_on_a_cpu_without_native_bf16_computes_in_float32_on_its_bf16_matrices(
    checkpoint, monkeypatch, caplog
):
    """Such a CPU (forced here by hiding oneDNN's bf16) computes a bf16 checkpoint in float32, says so, and
    keeps the matrices in bf16 for the compiled kernel: the same products as float32 weights (bf16 converts to
    float32 exactly), at half the bytes. Asking for a dtype overrides the choice of dtype."""
    if not compiled.available():
        pytest.skip(f"the compiled kernels do not run here: {compiled.unavailable_reason()}")
    real = prepack.available
    monkeypatch.setattr(prepack, "available", lambda dtype, device: dtype != torch.bfloat16 and real(dtype, device))
    folder = checkpoint("qwen2", dtype=torch.bfloat16)
    kept = LLM.load(folder)
    assert "no native bfloat16 arithmetic" in caplog.text
    assert kept.dtype == torch.float32 and kept.model.weight_form == "bf16-kept"
    matrices = [m for m in kept.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(matrices) == 4 * 2 + 1 + 1  # 2 layers' four matrices, the head, the untied table
    assert all(m.q.dtype == torch.bfloat16 and m.mode == "bf16" for m in matrices)
    plain = LLM.load(folder, dtype="float32", prepack=False)  # F.linear on the same values in float32
    ids = list(range(3, 40))
    expected = plain.logits(ids)
    assert (kept.logits(ids) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert LLM.load(folder, dtype="bfloat16").dtype == torch.bfloat16


def test_without_the_kernels_one_line_says_so_and_generation_runs(checkpoint):
    """MINILLM_KERNELS=0 stands for a machine without them (no compiler, no AVX2): one line, no traceback,
    and the PyTorch path gives tokens."""
    env = dict(os.environ, MINILLM_KERNELS="0")
    command = [sys.executable, "-m", "minillm", "generate", "--model", str(checkpoint("llama")), "--quantize", "int8"]
    out = subprocess.run([*command, "-n", "4", "--temperature", "0", "Hi"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "tok/s" in out.stderr
    lines = [line for line in out.stderr.splitlines() if "compiled decode kernels" in line]
    assert lines == ["minillm: compiled decode kernels unavailable (MINILLM_KERNELS=0); using PyTorch's slower path"]


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
    assert quantized.model.weight_form == ("q8_0" if mode == "int8" else "q4_1-g32-head-q8_0")
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
    cold = [
        llm.generate(p, max_new_tokens=8, temperature=0, use_prefix_cache=False, return_logits=True) for p in prompts
    ]
    batched = llm.generate(prompts, max_new_tokens=8, temperature=0, return_logits=True)
    assert sum(c.cached_tokens for c in batched) > 0
    for c, b in zip(cold, batched):
        # fast mode: lone and batched rows take different products (the kernels quantize few rows' activations,
        # bf16 rounds differently), so logits agree closely and tokens agree up to a near tie
        steps = min(len(c.token_ids), len(b.token_ids))
        diffs = (c.logits[:steps] - b.logits[:steps]).abs().amax(-1)
        assert diffs.max() <= 0.05 * c.logits.abs().max()
        margins = c.logits[:steps].topk(2).values.diff(dim=-1).abs()[:, 0]
        clear = next((i for i in range(steps) if margins[i] <= 2 * diffs[i]), steps)
        assert b.token_ids[:clear] == c.token_ids[:clear]
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


def test_int8_refuses_a_model_whose_sizes_are_not_whole_blocks(checkpoint):
    folder = checkpoint("llama", intermediate_size=100)
    with pytest.raises(MinillmError) as error:
        LLM.load(folder, quantize="int8")
    assert str(error.value) == "int8 quantizes blocks of 32 input channels, and the model's MLP size is 100"


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
