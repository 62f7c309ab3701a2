"""Structured outputs, measured: schema validity over many random schemas, the cost of the mask per token, and the
forward passes that forced-token skipping saves.

    python tools/bench_structured.py --out bench/structured.json
    python tools/make_bench_checkpoint.py /tmp/qwen05-q3 --dtype bfloat16 --tokenizer ../shared/tokenizers/qwen3
    python tools/bench_structured.py --speed-model /tmp/qwen05-q3 --out bench/structured.json

1. validity: `--schemas` random JSON schemas (objects with required and optional fields, arrays, enums, integers
   and numbers with bounds, strings with lengths and patterns, nesting), each answered once by the bundled model
   sampling at temperature 1 (all submitted at once, so they run batched), max_new_tokens 256. Every output
   that finished ("stop") is parsed and validated with jsonschema; the count that hit max_new_tokens ("length")
   is reported beside it. An invalid "stop" output is a bug.
2. speed: decode tokens per second of the same requests with and without a JSON schema (an object whose one
   string must outrun the 32 tokens, so no request ends early), forced-token skipping off (so both run one
   forward per token: the difference is the mask), alone and 8 at once, on
   `--speed-model` (a Qwen-sized model with Qwen3's 151k-token vocabulary is the case that matters), side by
   side in rounds; the median ratio and the best of each are reported.
3. forced tokens: forwards (engine steps) for one schema with fixed keys, with and without skipping.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_compare import cpu_name  # noqa: E402

from minillm import LLM  # noqa: E402

PROMPT = "Answer in JSON. Describe a person, a city and the weather there."
FIXED_KEYS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "verified"],
    "additionalProperties": False,
}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "pattern"] + (
        ["object", "array"] * 2 if depth < 3 else []
    )
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 12)}
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        return {"type": "number", "minimum": -rng.random() * 100, "maximum": rng.random() * 100}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 1, 2.5, None, True, "a b", "x"], rng.randint(1, 4))}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[A-Z][0-9]{3}$", "^(on|off)$"])}
    if kind == "array":
        low = rng.randint(0, 2)
        return {
            "type": "array",
            "items": random_schema(rng, depth + 1),
            "minItems": low,
            "maxItems": low + rng.randint(0, 3),
        }
    names = rng.sample(["id", "name", "kind", "tags", "score", "ok", "when", "where"], rng.randint(1, 5))
    return {
        "type": "object",
        "properties": {n: random_schema(rng, depth + 1) for n in names},
        "required": [n for n in names if rng.random() < 0.6],
        "additionalProperties": False,
    }


def validity(count: int, seed: int) -> dict:
    llm = LLM.load(kv_mb=256, max_batch=16)
    rng = random.Random(seed)
    schemas = [random_schema(rng) for _ in range(count)]
    start = time.perf_counter()
    handles = [
        llm.submit(PROMPT, json_schema=s, max_new_tokens=256, temperature=1.0, seed=i) for i, s in enumerate(schemas)
    ]
    stop = length = invalid = 0
    examples = []
    for s, h in zip(schemas, handles):
        c = h.result()
        if c.finish_reason == "length":
            length += 1
            continue
        try:
            jsonschema.validate(json.loads(c.text), s)
            stop += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            invalid += 1
            examples.append({"schema": s, "text": c.text, "error": str(e)[:200]})
    llm.check_invariants()
    return {
        "model": "bundled",
        "schemas": count,
        "finished_valid": stop,
        "hit_max_tokens": length,
        "finished_invalid": invalid,
        "invalid_examples": examples[:5],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _tok_s(llm, batch: int, schema: dict | None, tokens: int, seed: int) -> float:
    """Decode tokens per second over `batch` requests run together (forced-token skipping off)."""
    llm.configure(max_batch=batch)
    requests = []
    for i in range(batch):
        options = {"json_schema": schema} if schema else {"ignore_eos": True}
        r = llm.request(f"{PROMPT} ({seed}, {i})", max_new_tokens=tokens, temperature=1.0, seed=seed + i, **options)
        r.skip_forced = False
        requests.append(r)
    handles = [llm.engine.submit(r) for r in requests]
    done = [h.result() for h in handles]
    first = min(c.ttft_s for c in done)  # from the first token on: decode only
    steps = sum(len(c.token_ids) - 1 for c in done)
    return steps / max(max(c.ttft_s + c.decode_s for c in done) - first, 1e-9)


def speed(model: str, rounds: int, batches: list[int]) -> dict:
    llm = LLM.load(model)
    # a string far longer than the run, so every request (constrained or free) decodes all its tokens
    schema = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 4000}}, "required": ["notes"]}
    llm.generate(PROMPT, json_schema=schema, max_new_tokens=4)  # the tokenizer index and the grammar, built once
    out = {"model": model, "vocab": llm.config.vocab_size, "tokens": 32}
    for batch in batches:
        ratios, best = [], {"json_schema": 0.0, "free": 0.0}
        for i in range(rounds):
            order = ("free", "json_schema") if i % 2 == 0 else ("json_schema", "free")
            got = {name: _tok_s(llm, batch, schema if name == "json_schema" else None, 32, i) for name in order}
            ratios.append(got["json_schema"] / got["free"])
            best = {k: max(best[k], got[k]) for k in best}
            print(f"batch {batch} round {i + 1}: {got}", flush=True)
        out[f"batch{batch}"] = {
            "constrained_over_free_median": round(statistics.median(ratios), 3),
            "constrained_best_tok_s": round(best["json_schema"], 2),
            "free_best_tok_s": round(best["free"], 2),
            "best_over_best": round(best["json_schema"] / best["free"], 3),
        }
    return out


def forced() -> dict:
    llm = LLM.load()
    out = {"model": "bundled", "schema": FIXED_KEYS}
    for max_whitespace in (0, 8):
        row = {}
        for skip in (False, True):
            llm.configure()
            r = llm.request(PROMPT, json_schema=FIXED_KEYS, max_new_tokens=200, temperature=0,
                            max_whitespace=max_whitespace)  # fmt: skip
            r.skip_forced = skip
            h = llm.engine.submit(r)
            steps = 0
            while llm.engine.step():
                steps += 1
            c = h.result()
            row["skipping" if skip else "one_step_each"] = {
                "forwards": steps,
                "tokens": len(c.token_ids),
                "forced": c.forced_tokens,
                "finish": c.finish_reason,
            }
        row["forwards_saved"] = round(1 - row["skipping"]["forwards"] / row["one_step_each"]["forwards"], 3)
        out[f"max_whitespace_{max_whitespace}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-model", help="checkpoint for the speed part (skipped if not given)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8", help="speed: how many requests at once, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    report.update(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version())  # fmt: skip
    if args.speed_model:
        batches = [int(b) for b in args.batches.split(",")]
        report["speed"] = {**report.get("speed", {}), **speed(args.speed_model, args.rounds, batches)}
        print(json.dumps(report["speed"]), flush=True)
    else:
        report["forced"] = forced()
        print(json.dumps(report["forced"]), flush=True)
        report["validity"] = validity(args.schemas, args.seed)
        print(json.dumps(report["validity"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
