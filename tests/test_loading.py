"""Memory-mapped safetensors reading (safetensors_mmap.py) and prepacked weights (prepack.py)."""

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minillm import LLM
from minillm.errors import MinillmError
from minillm.kernels import compiled
from minillm.loading import prepack
from minillm.loading.safetensors_mmap import SafetensorsFile


def test_views_hold_what_safetensors_reads(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).view(2, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    ours = SafetensorsFile(tmp_path / "t.safetensors").tensors
    ref = load_file(tmp_path / "t.safetensors")
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(ours[name], ref[name]), name


def test_writing_a_view_leaves_the_file_alone(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "t.safetensors")
    SafetensorsFile(tmp_path / "t.safetensors").tensors["w"].zero_()  # a private, copy-on-write mapping
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], torch.ones(4))


def rss_file_bytes() -> int:
    """Resident pages of this process that are mapped from files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_weights_are_mapped_not_copied_and_release_drops_their_pages(tmp_path):
    size = 64 * 2**20
    save_file({"big": torch.ones(size // 4)}, tmp_path / "big.safetensors")
    file = SafetensorsFile(tmp_path / "big.safetensors")
    before = rss_file_bytes()
    assert file.tensors["big"].sum() == size // 4  # touching every page maps it in: no anonymous copy
    touched = rss_file_bytes()
    assert touched - before >= 0.9 * size
    file.release(file.tensors["big"])
    assert touched - rss_file_bytes() >= 0.9 * size
    assert file.tensors["big"].sum() == size // 4  # still readable: paged in again from the file


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda raw: raw[:4], "shorter than the 8-byte header length"),
        (lambda raw: struct.pack("<Q", 10**9) + raw[8:], "header claims"),
        (lambda raw: raw[:-8], "does not fit its byte range"),
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, message):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(16)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MinillmError, match=message):
        SafetensorsFile(path)


@pytest.mark.skipif(not prepack.available(torch.float32, "cpu"), reason="this torch build has no oneDNN")
def test_prepacked_and_plain_weights_agree(checkpoint):
    folder = checkpoint("qwen2", tie_word_embeddings=True)
    packed, plain = LLM.load(folder), LLM.load(folder, prepack=False)
    ids = list(range(3, 60))
    assert (packed.logits(ids) - plain.logits(ids)).abs().max() <= 1e-4
    attn = packed.model.model.layers[0].self_attn
    assert attn.qkv_proj.out_features == plain.model.model.layers[0].self_attn.q_proj.out_features + 2 * (
        plain.model.model.layers[0].self_attn.k_proj.out_features
    )
    assert attn.qkv_proj.bias is not None  # Qwen2's q/k/v biases, stacked too
    a = packed.generate(ids, max_new_tokens=12, temperature=0, use_prefix_cache=False)
    b = plain.generate(ids, max_new_tokens=12, temperature=0, use_prefix_cache=False)
    assert a.token_ids == b.token_ids


@pytest.mark.skipif(not prepack.available(torch.bfloat16, "cpu"), reason="this torch build has no oneDNN bf16")
def test_float32_packs_for_the_kernel_or_by_stacking_bfloat16_by_reordering_for_onednn(checkpoint):
    """Each dtype gets the kernel that streams best (prepack.py): float32 weights are packed in blocks of 16
    output channels for the compiled kernel where it runs (else they stay a plain stacked matrix for F.linear,
    whose product it then is exactly), bfloat16 ones become oneDNN's opaque layout; exact mode without the
    compiled kernel reorders float32 for oneDNN too (MKL's rows are not independent of the other rows' bits)."""
    folder = checkpoint("llama")
    kernel = compiled.available()
    for options, onednn in (
        (dict(dtype="float32"), False),
        (dict(dtype="float32", exact=True), not kernel),
        (dict(dtype="bfloat16"), True),
        (dict(dtype="bfloat16", exact=True), True),
    ):
        model = LLM.load(folder, **options).model
        assert all(m.onednn == onednn for m in model.modules() if isinstance(m, prepack.PackedLinear)), options
    torch.manual_seed(0)
    parts = [nn.Linear(64, n) for n in (64, 16, 16)]
    x = torch.randn(3, 64)
    fp32 = prepack.PackedLinear(*parts, dtype=torch.float32, onednn=False)
    stacked = torch.cat([p.weight for p in parts]).detach()
    reference = F.linear(x, stacked, torch.cat([p.bias for p in parts]).detach())
    assert fp32.kernel == kernel
    if fp32.kernel:
        assert torch.equal(fp32.weight, compiled.pack_f32(stacked)) and fp32.weight.shape == (6, 64, 16)
        assert torch.allclose(fp32(x), reference, rtol=0, atol=1e-5)
    else:
        assert fp32.weight.layout == torch.strided and torch.equal(fp32.weight, stacked)
        assert torch.equal(fp32(x), reference)
    bf16 = prepack.PackedLinear(*parts, dtype=torch.bfloat16, onednn=True)
    assert bf16.weight.layout == torch._mkldnn and fp32.weight_bytes == 2 * bf16.weight_bytes
    single = nn.Linear(64, 8)
    assert (
        prepack.PackedLinear(single, dtype=torch.float32, onednn=False).weight.data_ptr() != single.weight.data_ptr()
    )  # a copy


def test_prepack_refused_where_it_cannot_run(checkpoint):
    with pytest.raises(MinillmError, match="prepacked weights need"):
        LLM.load(checkpoint("llama"), dtype="float16", prepack=True)
    assert not isinstance(LLM.load(checkpoint("llama"), dtype="float16").model.lm_head, prepack.PackedLinear)


def test_index_pointing_at_the_wrong_shard_is_refused(tmp_path):
    from checkpoints import make_checkpoint

    folder = make_checkpoint(tmp_path / "sharded", "llama", max_shard_size="20KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MinillmError, match=f"lacks tensor {name}"):
        LLM.load(folder)
