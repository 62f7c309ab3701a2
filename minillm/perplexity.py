"""How well a model predicts a text (perplexity), and how far a cheaper run of it (int8, int4, another GGUF type)
strays from a reference run (KL divergence): the two numbers that say what quantization costs.

The text is scored in windows of `context` tokens that advance by `stride`: every token is scored once, from
the logits at the position before it, and every token after the first window sees at least context - stride
tokens before it (stride = context / 2 by default). Perplexity is exp(mean negative log-likelihood); its
standard error follows from the spread of the per-token values (delta method: ppl x the standard error of the
mean NLL).

A reference run saves its log-probabilities (float16, every vocabulary entry, at every scored position,
renormalized when read, so the rounding costs about 1e-7 nats instead of 1e-4); a later run with --kl-base
reads them and reports, per position, KL(reference || this run) and whether the most likely token is the
same: the mean, the 99th percentile and the share unchanged. As in llama.cpp's perplexity tool, the saved
file belongs to one text and one tokenizer: a mismatch is refused.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MinillmError


@dataclass
class Windows:
    """Which tokens each window scores: window [begin, end) scores targets [first, end)."""

    spans: list[tuple[int, int, int]]  # (begin, first scored position, end)

    @classmethod
    def over(cls, num_tokens: int, context: int, stride: int) -> Windows:
        """Windows end `stride` tokens apart (the first `context` tokens in; the last at the text's end), each
        `context` tokens long where the text allows, and score what the window before did not reach. A window
        must overlap the scored part of the one before by at least one token, to predict its first target."""
        if not 0 < stride < context:
            raise MinillmError(f"--stride must be between 1 and --context - 1 ({context - 1}), got {stride}")
        if num_tokens < 2:
            raise MinillmError("the text has fewer than 2 tokens; there is nothing to score")
        spans, scored_until, end = [], 1, min(context, num_tokens)
        while True:
            spans.append((max(0, end - context), scored_until, end))
            if end == num_tokens:
                return cls(spans)
            scored_until, end = end, min(end + stride, num_tokens)


@dataclass
class Scores:
    nll: torch.Tensor  # [positions] negative log-likelihood of each scored token (float64)
    kl: torch.Tensor | None = None  # [positions] KL(reference || this run), nats
    same_top1: torch.Tensor | None = None  # [positions] bool: the most likely token is the reference's

    @property
    def perplexity(self) -> tuple[float, float]:
        """exp(mean NLL) and its standard error."""
        mean = self.nll.mean().item()
        sem = self.nll.std().item() / math.sqrt(len(self.nll)) if len(self.nll) > 1 else float("nan")
        return math.exp(mean), math.exp(mean) * sem

    def summary(self) -> dict:
        ppl, err = self.perplexity
        out = {"tokens_scored": len(self.nll), "perplexity": ppl, "perplexity_stderr": err}
        if self.kl is not None:
            out["kl_mean"] = self.kl.mean().item()
            out["kl_p99"] = torch.quantile(self.kl, 0.99).item()
            out["top1_same"] = self.same_top1.float().mean().item()
        return out


def score(llm, text: str, context: int, stride: int, save: Path | None = None, base: Path | None = None) -> Scores:
    """Score text with llm (an LLM); save: write this run's log-probabilities there; base: compare with a saved
    run's."""
    from safetensors.torch import load_file, save_file

    tokens = llm.tokenizer.encode(text)
    if context > llm.config.context_length:
        raise MinillmError(f"--context {context} exceeds the model's context of {llm.config.context_length} tokens")
    windows = Windows.over(len(tokens), context, stride)
    reference = None
    if base is not None:
        try:
            reference = load_file(str(base))
        except Exception as e:  # missing, truncated or not a safetensors file
            raise MinillmError(f"cannot read the --kl-base file {base} ({e})") from None
        if reference["tokens"].tolist() != tokens:
            raise MinillmError(
                f"{base} was saved from another text or tokenizer; score the same file with the same model"
            )
    targets = torch.tensor(tokens)
    nll, kl, same, saved, top1 = [], [], [], [], []
    for number, (begin, first, end) in enumerate(windows.spans, 1):
        logits = llm.logits(tokens[begin:end])[first - 1 - begin : end - 1 - begin]  # [scored, vocab]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        nll.append(-log_probs.gather(1, targets[first:end, None]).squeeze(1))
        if save is not None:
            saved.append(log_probs.to(torch.float16))
            top1.append(log_probs.argmax(-1))
        if reference is not None:
            ref = torch.log_softmax(reference["log_probs"][first - 1 : end - 1].double(), dim=-1)
            kl.append((ref.exp() * (ref - log_probs)).sum(-1))
            same.append(reference["top1"][first - 1 : end - 1] == log_probs.argmax(-1))
        ppl = math.exp(torch.cat(nll).mean().item())
        print(f"\r[perplexity] window {number}/{len(windows.spans)}, ppl so far {ppl:.4f}", end="", file=sys.stderr)
    print("", file=sys.stderr)
    scores = Scores(torch.cat(nll))
    if reference is not None:
        scores.kl, scores.same_top1 = torch.cat(kl), torch.cat(same)
    if save is not None:
        save_file(  # log_probs: [positions, vocab]; row i predicts token i + 1
            {"log_probs": torch.cat(saved), "top1": torch.cat(top1), "tokens": targets},
            str(save),
            metadata={"context": str(context), "stride": str(stride)},
        )
    return scores
