"""python -m minillm verify --model M: the test suite's properties, checked on any checkpoint.

The tests prove the engine right on tiny random checkpoints; this runs the same properties on yours, in a
minute or two, so a change to the engine (or an unusual checkpoint) can be checked where it matters:

    parity      logits equal transformers' (when transformers is installed; skipped otherwise)
    cache       a prefix-cache hit gives the logits of a cold run (fast mode: within tolerance)
    chunked     a prompt prefilled in chunks gives the logits of one whole prefill
    batched     requests run together give the tokens and logits they give alone
    exact       exact mode: cold, warm and batched runs bitwise equal
    kv_bytes    the KV pool stores 2 x layers x kv_heads x head_dim elements per token, as the config implies

Every check runs on the same loaded weights. Exit status 0 only if none fails.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .llm import LLM

# Fast-mode agreement, relative to the largest logit: fp32 differences come from summation order (about 1e-6
# of the logits' scale); bf16 and fp16 round every activation to 8 and 11 bits of mantissa, so two orders of
# summation can differ far more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str


def _prompts(llm: LLM, count: int, length: int, seed: int) -> list[list[int]]:
    """Random token prompts sharing a common head (so the cache and the batch have something to share)."""
    rng = random.Random(seed)
    low = min(1000, llm.config.vocab_size // 4)
    head = [rng.randrange(low, llm.config.vocab_size) for _ in range(length // 2)]
    return [head + [rng.randrange(low, llm.config.vocab_size) for _ in range(length - len(head))] for _ in range(count)]


def _run(llm: LLM, prompts: list[list[int]], new_tokens: int, **options):
    return llm.generate(prompts, max_new_tokens=new_tokens, temperature=0, return_logits=True, **options)


def _max_diff(a, b) -> float:
    """Largest difference between two runs' step logits (same shapes: EOS is off, so every run takes all steps)."""
    return max(float((x.logits - y.logits).abs().max()) for x, y in zip(a, b))


def _limit(llm: LLM, completions) -> float:
    return TOLERANCE[llm.dtype] * max(1.0, max(float(c.logits.abs().max()) for c in completions))


def check_parity(llm: LLM, folder, prompts) -> Check:
    try:  # optional: transformers is the test oracle, never a dependency of the package
        transformers = importlib.import_module("transformers")
    except ImportError:
        return Check("parity", "skip", "transformers is not installed (pip install transformers to compare)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=llm.dtype).eval()
    worst = scale = 0.0
    with torch.inference_mode():
        for ids in prompts:
            ref = model(torch.tensor([ids])).logits[0].float()
            worst = max(worst, float((llm.logits(ids) - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    limit = TOLERANCE[llm.dtype] * max(1.0, scale)
    return Check(
        "parity",
        "pass" if worst <= limit else "fail",
        f"largest logit difference to transformers {worst:.2e} (limit {limit:.0e}) over {len(prompts)} prompts",
    )


def check_cache(llm: LLM, prompts, new_tokens: int) -> Check:
    llm.configure()
    cold = _run(llm, prompts, new_tokens, use_prefix_cache=False)
    llm.configure()
    llm.generate([p[: len(p) // 2] for p in prompts], max_new_tokens=1)  # cache the first halves
    warm = [llm.generate(p, max_new_tokens=new_tokens, temperature=0, return_logits=True) for p in prompts]
    hits = sum(w.cached_tokens for w in warm)
    worst, limit = _max_diff(warm, cold), _limit(llm, cold)
    ok = hits > 0 and worst <= limit
    return Check(
        "cache",
        "pass" if ok else "fail",
        f"{hits} prompt tokens from the cache; largest logit difference to cold runs {worst:.2e} (limit {limit:.0e})",
    )


def check_chunked(llm: LLM, prompts, new_tokens: int) -> Check:
    llm.configure(max_prefill_tokens=max(len(p) for p in prompts))
    whole = [
        llm.generate(p, max_new_tokens=new_tokens, temperature=0, return_logits=True, use_prefix_cache=False)
        for p in prompts
    ]
    llm.configure(max_prefill_tokens=7)
    chunked = [
        llm.generate(p, max_new_tokens=new_tokens, temperature=0, return_logits=True, use_prefix_cache=False)
        for p in prompts
    ]
    worst, limit = _max_diff(chunked, whole), _limit(llm, whole)
    llm.configure()
    return Check(
        "chunked",
        "pass" if worst <= limit else "fail",
        f"prefill in 7-token chunks against whole: largest logit difference {worst:.2e} (limit {limit:.0e})",
    )


def check_batched(llm: LLM, prompts, new_tokens: int) -> Check:
    llm.configure()
    alone = [_run(llm, [p], new_tokens, use_prefix_cache=False)[0] for p in prompts]
    llm.configure(max_batch=len(prompts))
    together = _run(llm, prompts, new_tokens)
    worst, limit = _max_diff(together, alone), _limit(llm, alone)
    same = sum(a.token_ids == t.token_ids for a, t in zip(alone, together))
    llm.check_invariants()
    ok = worst <= limit and same == len(prompts)
    return Check(
        "batched",
        "pass" if ok else "fail",
        f"{same}/{len(prompts)} requests with the same tokens batched and alone; largest logit difference "
        f"{worst:.2e} (limit {limit:.0e})",
    )


def check_exact(llm: LLM, prompts, new_tokens: int) -> Check:
    exact = LLM(llm.model, llm.tokenizer, llm.defaults, llm.device, exact=True, exact_chunk=16, exact_decode_rows=4)
    cold = [_run(exact, [p], new_tokens, use_prefix_cache=False)[0] for p in prompts]  # the cache stays empty
    exact.generate([p[: len(p) // 2 + 1] for p in prompts], max_new_tokens=1)
    warm_batched = _run(exact, prompts, new_tokens)
    equal = sum(torch.equal(a.logits, b.logits) and a.token_ids == b.token_ids for a, b in zip(cold, warm_batched))
    hits = sum(c.cached_tokens for c in warm_batched)
    ok = equal == len(prompts) and hits > 0
    return Check(
        "exact",
        "pass" if ok else "fail",
        f"{equal}/{len(prompts)} requests bitwise equal cold-alone and cached-batched ({hits} cached tokens)",
    )


def check_kv_bytes(llm: LLM) -> Check:
    c = llm.config
    expected = 2 * c.num_layers * c.num_kv_heads * c.head_dim * llm.dtype.itemsize
    got = llm.engine.pool.slot_bytes()
    return Check(
        "kv_bytes",
        "pass" if got == expected else "fail",
        f"{got} bytes per token; config implies 2 x {c.num_layers} layers x {c.num_kv_heads} kv heads x "
        f"{c.head_dim} x {llm.dtype.itemsize} bytes = {expected}",
    )


def _guarded(name: str, check, *args) -> Check:
    """A check that crashes (a broken invariant, say) is a failed check, reported like the others."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - whatever breaks is the finding
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Check(name, "fail", f"raised {type(e).__name__}: {first_line}")


def verify(llm: LLM, folder, prompts: int = 4, length: int = 48, new_tokens: int = 8, seed: int = 0) -> list[Check]:
    llm.defaults.eos_token_ids = []  # compare every step
    sample = _prompts(llm, prompts, length, seed)
    checks = [_guarded("parity", check_parity, llm, folder, sample[:2])]
    for name, check in (("cache", check_cache), ("chunked", check_chunked), ("exact", check_exact)):
        if llm.config.rope.type == "dynamic":  # its KV is never reused, and its prefill is never chunked
            checks.append(Check(name, "skip", "dynamic NTK RoPE: the prefix cache and chunked prefill are off"))
        else:
            checks.append(_guarded(name, check, llm, sample, new_tokens))
    checks.append(_guarded("batched", check_batched, llm, sample, new_tokens))
    checks.append(_guarded("kv_bytes", check_kv_bytes, llm))
    return checks


def main(args) -> int:
    from .llm import bundled_model
    from .loading.loader import resolve_model_dir

    folder = bundled_model() if args.model is None else resolve_model_dir(args.model)
    llm = LLM.load(folder, dtype=args.dtype, device=args.device, prepack=False if args.no_prepack else None)
    start = time.perf_counter()
    checks = verify(llm, folder, prompts=args.prompts)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(folder),
                    "dtype": str(llm.dtype),
                    "passed": not failed,
                    "seconds": round(time.perf_counter() - start, 1),
                    "checks": [asdict(c) for c in checks],
                }
            )
        )
    else:
        for c in checks:
            print(f"{c.status.upper():4}  {c.name:9} {c.detail}")
        print(
            f"{'FAILED' if failed else 'OK'}: {len(checks) - len(failed)} of {len(checks)} checks did not fail "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    return 1 if failed else 0
