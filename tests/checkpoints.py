"""Tiny random-init checkpoints written by transformers' save_pretrained, plus a small trained tokenizer.

Nothing is downloaded: the tests make every file a published checkpoint has.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 320  # model vocab: the tokenizer's ~300 tokens, padded as real checkpoints pad theirs

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, "
    "emoji \U0001f600!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "In the beginning the model read the document, then the question, and answered.\n",
] * 20

FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


def write_tokenizer(folder: Path, bos: bool = True) -> None:
    """A byte-level BPE tokenizer (every string encodes, multi-byte characters split across tokens),
    with Llama-style BOS added by the post-processor when `bos`, and a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>" if bos else None,
        "eos_token": "</s>",
        "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_checkpoint(
    folder: Path,
    family: str = "llama",
    dtype=torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    bos: bool = True,
    generation: dict | None = None,
    **overrides,
) -> Path:
    """Write a random-init checkpoint of `family` (2 layers, hidden 64, 4 heads over 2 KV heads)."""
    import transformers

    kwargs = dict(FAMILIES[family])
    model_type = kwargs.pop("model_type")
    kwargs.update(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kwargs.get("attention_bias") or family == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    with torch.no_grad():  # norms start at one; random weights exercise the multiply
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_args = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_args)
    write_tokenizer(folder, bos=bos)
    gen = {"bos_token_id": 0, "eos_token_id": 1}
    gen.update(generation or {})
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def hf_model(folder: Path, dtype=None):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").eval()
