"""Train minillm's bundled model: a small Llama-architecture code model on the Python standard library.

    python tools/train_tiny.py                      # the shipped model: about an hour on 2 CPU cores
    python tools/train_tiny.py --toy --steps 2 --out /tmp/toy   # a smoke run in seconds

Corpus: the .py files of the standard library of the Python running this script (tests, idlelib and
site-packages left out), licensed under the PSF License Agreement; every Python install ships it, so the
run needs no download. Files are split into train and held-out sets by a hash of their path.
Steps: train a byte-level BPE tokenizer (tokenizers), train the model with minillm's own model code and
torch autograd, then write a Hugging Face checkpoint (LlamaForCausalLM config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) and training_report.json. Seeded: the
same Python version and torch build give the same model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.model.config import parse_config  # noqa: E402
from minillm.model.model import CausalLM, SequenceKV  # noqa: E402

EOT = "<|endoftext|>"  # separates files; also the model's EOS

SHIPPED = dict(
    vocab=4096, hidden=256, layers=6, heads=8, kv_heads=2, intermediate=704, seq_len=256, batch=16, steps=1200, lr=3e-3
)
TOY = dict(vocab=300, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, seq_len=32, batch=2, steps=2, lr=1e-3)


def corpus_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo")
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    return files[:limit] if limit else files


def split_corpus(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held out): about 5% of files held out, chosen by a hash of the file name."""
    held = [f for f in files if hashlib.sha256(f.name.encode()).digest()[0] % 20 == 0]
    train = [f for f in files if f not in held]
    return (train, held) if held else (files[:-1], files[-1:])


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_all(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for encoding in tok.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def hf_config(h: dict, eot: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": h["vocab"],
        "hidden_size": h["hidden"],
        "intermediate_size": h["intermediate"],
        "num_hidden_layers": h["layers"],
        "num_attention_heads": h["heads"],
        "num_key_value_heads": h["kv_heads"],
        "head_dim": h["hidden"] // h["heads"],
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }


def init_weights(model: CausalLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # GPT-2 style: small normal init, residual outputs scaled down by depth
                std = (
                    0.02 / math.sqrt(2 * model.config.num_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 0.02
                )
                p.copy_(torch.randn(p.shape, generator=g) * std)


def sequence_loss(model: CausalLM, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of one window [seq_len + 1]."""
    tokens = window[:-1]
    logits = model(tokens, torch.arange(len(tokens)), SequenceKV())  # attention within the window, nothing kept
    return F.cross_entropy(logits, window[1:])


@torch.no_grad()
def evaluate(model: CausalLM, data: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    starts = range(0, len(data) - seq_len - 1, seq_len)
    losses = [sequence_loss(model, data[s : s + seq_len + 1]).item() for s in list(starts)[:max_windows]]
    return sum(losses) / len(losses)


def unigram_loss(train: torch.Tensor, held_out: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of the held-out tokens under token frequencies counted on the training set (add-one)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[held_out].mean())


def progress(step: int, steps: int, loss: float, tok_s: float, elapsed: float) -> None:
    done = int(30 * step / steps)
    eta = elapsed / step * (steps - step)
    sys.stderr.write(
        f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{steps} loss {loss:.3f} "
        f"{tok_s:,.0f} tok/s eta {eta / 60:.1f} min "
    )
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "weights",
        help="checkpoint folder to write (default: weights/)",
    )
    parser.add_argument("--toy", action="store_true", help="a tiny config on a few files, for smoke tests")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    h = dict(TOY if args.toy else SHIPPED)
    if args.steps is not None:
        h["steps"] = args.steps
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)

    files = corpus_files(limit=40 if args.toy else None)
    train_files, held_files = split_corpus(files)
    started = time.time()
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    tok = train_tokenizer(train_texts, h["vocab"])
    h["vocab"] = tok.get_vocab_size()
    train_ids, held_ids = encode_all(tok, train_texts), encode_all(tok, held_texts)
    print(
        f"corpus: {len(train_files)} train files ({len(train_ids):,} tokens), {len(held_files)} held-out "
        f"({len(held_ids):,} tokens); vocabulary {h['vocab']}",
        file=sys.stderr,
    )

    eot = tok.token_to_id(EOT)
    config = hf_config(h, eot)
    model = CausalLM(parse_config(config))
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: one matrix embeds tokens and scores them
    init_weights(model, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", file=sys.stderr)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=h["lr"],
        betas=(0.9, 0.95),
    )
    warmup = max(1, h["steps"] // 20)
    g = torch.Generator().manual_seed(args.seed)
    seq_len, tokens_per_step = h["seq_len"], h["seq_len"] * h["batch"]
    train_start = time.time()
    model.train()
    for step in range(1, h["steps"] + 1):
        lr = h["lr"] * min(
            step / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, h["steps"] - warmup))))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (h["batch"],), generator=g).tolist()
        total = 0.0
        for s in starts:  # one sequence at a time (the model runs one sequence); gradients accumulate
            loss = sequence_loss(model, train_ids[s : s + seq_len + 1]) / h["batch"]
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.time() - train_start
        progress(step, h["steps"], total, step * tokens_per_step / elapsed, elapsed)
    sys.stderr.write("\n")
    model.eval()
    round_to_bfloat16(model)  # what is shipped, so the held-out loss below is the shipped model's
    held_loss = evaluate(model, held_ids, seq_len)
    baseline = unigram_loss(train_ids, held_ids, h["vocab"])
    write_checkpoint(
        model,
        config,
        tok,
        h,
        args,
        {
            "parameters": params,
            "steps": h["steps"],
            "tokens_seen": h["steps"] * tokens_per_step,
            "train_tokens": len(train_ids),
            "held_out_tokens": len(held_ids),
            "held_out_loss_nats_per_token": round(held_loss, 4),
            "unigram_baseline_nats_per_token": round(baseline, 4),
            "train_minutes": round((time.time() - train_start) / 60, 1),
            "total_minutes": round((time.time() - started) / 60, 1),
        },
    )
    print(
        f"held-out loss {held_loss:.3f} nats/token (unigram baseline {baseline:.3f}); wrote {args.out}", file=sys.stderr
    )
    return 0


def round_to_bfloat16(model: CausalLM) -> None:
    """Weights are shipped in bfloat16 (half the bytes; config.json still says float32, so they are
    computed in float32). Round them now so that evaluation sees exactly what is shipped."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def write_checkpoint(model: CausalLM, config: dict, tok: Tokenizer, h: dict, args, report: dict) -> None:
    """The Hugging Face layout: transformers loads this folder as it loads any Llama checkpoint."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    eot = tok.token_to_id(EOT)
    state = {
        k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": EOT,
                "model_max_length": config["max_position_embeddings"],
            },
            indent=2,
        )
        + "\n"
    )
    (out / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": eot, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 96}, indent=2
        )
        + "\n"
    )
    report.update(python=sys.version.split()[0], torch=torch.__version__, seed=args.seed, hyperparameters=h)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
