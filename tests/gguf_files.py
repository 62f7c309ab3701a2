"""GGUF files written the way llama.cpp's converter writes them, from the tiny checkpoints of checkpoints.py:
its tensor names, its q/k row permutation for llama files, its metadata keys, its tokenizer arrays, and any
block type (quantized by ggml's own gguf package; K-quant blocks filled with random codes and small scales,
since that package has no K-quant quantizer). transformers, loading the same file, is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minillm.loading.gguf_import import GLOBAL_NAMES, LAYER_NAMES

# Bytes per block and values per block of the K-quants, and where each block's f16 scales sit.
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "Q3_K": (110, (108,))}


def _gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    for gguf, hf in GLOBAL_NAMES.items():
        if stem == hf:
            return f"{gguf}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)  # model.layers.N.rest
    gguf = next(g for g, h in LAYER_NAMES.items() if h == rest)
    return f"blk.{layer}.{gguf}.{suffix}"


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head reordered so that its RoPE rotates adjacent pairs."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _random_k_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    size, scale_offsets = K_QUANTS[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, cols // 256, len(scale_offsets))).astype(np.float16)
    for i, offset in enumerate(scale_offsets):
        blocks[..., offset : offset + 2] = scales[..., i : i + 1].view(np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(folder: Path, path: Path, kind: str = "F32", seed: int = 0, spm: list | None = None) -> Path:
    """The checkpoint in `folder` as a GGUF file: 2-D weights in block type `kind` (the embedding too), norms
    and biases in F32 as llama.cpp keeps them. spm: a SentencePiece vocabulary [(piece, score, type)] to write
    instead of the checkpoint's byte-level BPE (as llama.cpp writes a Llama 2 or Mistral tokenizer.model)."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    # tokenizer: byte-level BPE, the model's vocabulary padded as llama.cpp's converter pads it
    vocab = {i: t for t, i in tok["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tok["added_tokens"]}
    specials = {a["id"] for a in tok["added_tokens"]}
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    types = [3 if i in specials else 4 if i not in vocab else 1 for i in range(config["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    if spm is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_add_bos_token(tok_config.get("bos_token") is not None)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([piece for piece, _, _ in spm])
        writer.add_token_scores([score for _, score, _ in spm])
        writer.add_token_types([kind for _, _, kind in spm])
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(True)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_chat_template(tok_config["chat_template"])
    rng = np.random.default_rng(seed)
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute(data, heads if "q_proj" in name else kv_heads)
        if data.ndim == 1 or kind == "F32":
            writer.add_tensor(_gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
        elif kind == "F16":
            writer.add_tensor(_gguf_name(name), data.astype(np.float16))
        elif kind in K_QUANTS:
            blocks = _random_k_blocks(kind, *data.shape, rng)
            writer.add_tensor(
                _gguf_name(name), blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType[kind]
            )
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            blocks = gguf.quants.quantize(data, qtype)
            writer.add_tensor(_gguf_name(name), blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own GGUF reader (float32): the oracle for the file's weights."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]
