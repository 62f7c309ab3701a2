"""Write a Qwen2.5-0.5B-shaped checkpoint with random weights, so every benchmark runs without a download.

    python tools/make_bench_checkpoint.py /tmp/qwen-0.5b-shape --dtype float32

24 layers, hidden 896, 14 query heads over 2 KV heads (head_dim 64), intermediate 4864, vocab 151936,
tied embeddings, q/k/v biases: the real model's shapes, so a forward pass costs what the real one costs.
The text it writes is noise; speed is all it is for. The tokenizer is a small byte-level BPE trained on
this script's own source (the benchmarks feed token ids, so only its presence matters), or, with
`--tokenizer DIR`, the tokenizer.json and tokenizer_config.json found there (the serving benchmark sends
text and chat messages to servers that tokenize it themselves, so it wants a real tokenizer and chat
template: `--tokenizer ../shared/tokenizers/qwen3`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 21,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


def tensor_shapes(c: dict, layers: int) -> dict[str, tuple[int, ...]]:
    h, kv = c["hidden_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (c["intermediate_size"], h),
                p + "mlp.up_proj.weight": (c["intermediate_size"], h),
                p + "mlp.down_proj.weight": (h, c["intermediate_size"]),
            }
        )
    return shapes


def write_checkpoint(
    out: Path, dtype: torch.dtype, layers: int | None = None, seed: int = 0, tokenizer: Path | None = None
) -> Path:
    config = dict(QWEN25_05B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config, config["num_hidden_layers"]).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 0.1)
        tensors[name] = t.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643, "do_sample": False}))
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / name, out / name)
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([Path(__file__).read_text()], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layers", type=int, help="fewer layers for a quick try (default: 24, the real depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, help="copy tokenizer.json and tokenizer_config.json from this folder")
    args = parser.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    write_checkpoint(args.out, dtype, args.layers, args.seed, args.tokenizer)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
