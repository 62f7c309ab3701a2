"""Single-stream speed in every weight mode, side by side with llama.cpp's same modes, in one interleaved run.

    python tools/bench_decode.py --model /tmp/serve-fp32 --bf16-model /tmp/serve-bf16 --gguf-dir /tmp/llama \
        --out bench/decode_avx2.json

minillm: float32, bf16, int8 (Q8_0 form) and int4 (Q4_1 form, group 32), from one checkpoint (the bf16 row
from its bf16 copy when given); quantized modes compute in bf16 where the CPU has native bf16, else float32.
llama.cpp (when its `llama-bench` is found: --llama-bench, $LLAMA_BENCH or PATH): the same weights as GGUF
files in --gguf-dir, named serve-f32.gguf, serve-bf16.gguf, serve-q8_0.gguf, serve-q4_0.gguf, serve-q4_1.gguf
(README says how they are made), run with `-t <threads>`. Each round measures every engine once, in a rotated
order: decode tokens/s over 64 tokens (minillm after a 128-token prompt; llama-bench `-p 0 -n 64` from an
empty context: in the AVX-512 build any prompt batch on the Q8_0 and Q4_0 files segfaulted in its repacked
kernels, `-d 128` included, so minillm decodes at the slightly longer context) and prefill tokens/s of a
512-token prompt (`-p 512 -n 0 --repack 0`, the setting under which its quantized prefill runs there).
Reported: the machine's kind (vendor; AVX2 only, AVX-512, AVX-512 with bf16), best round per engine, the ratios the
issue asks for, each minillm mode's share of the bandwidth bound (read bandwidth probed each round / bytes a
decode step reads), and the load time and resident memory of each minillm mode in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_speed import interleaved, read_bandwidth_gbs  # noqa: E402

from minillm import LLM  # noqa: E402
from minillm.kernels import compiled  # noqa: E402
from minillm.loading import prepack  # noqa: E402
from minillm.loading.prepack import PackedLinear  # noqa: E402
from minillm.loading.quantize import QuantizedLinear  # noqa: E402

LLAMA = {
    "llama.cpp f32": "serve-f32.gguf",
    "llama.cpp bf16": "serve-bf16.gguf",
    "llama.cpp q8_0": "serve-q8_0.gguf",
    "llama.cpp q4_0": "serve-q4_0.gguf",
    "llama.cpp q4_1": "serve-q4_1.gguf",
}
PEERS = [  # (ours, llama.cpp's): the same weights in the nearest format (int4 is Q4_1's form; Q4_0 is the target)
    ("minillm fp32", "llama.cpp f32"),
    ("minillm bf16", "llama.cpp bf16"),
    ("minillm int8", "llama.cpp q8_0"),
    ("minillm int4", "llama.cpp q4_0"),
    ("minillm int4", "llama.cpp q4_1"),
]


def minillm_modes(model: str, bf16_model: str | None) -> dict[str, tuple[str, str | None, str | None]]:
    """name -> (checkpoint, dtype, quantize). Activations of the quantized modes in bf16 where the CPU has
    native bf16 arithmetic, else float32 (the fastest each CPU has, as the loader's default would choose). The
    bf16 row loads --bf16-model with its default dtype when given (on a CPU without native bf16: float32
    activations, the bf16 matrices kept), else --model converted to bfloat16."""
    activations = "bfloat16" if prepack.available(torch.bfloat16, "cpu") else "float32"
    return {
        "minillm fp32": (model, "float32", None),
        "minillm bf16": (bf16_model, None, None) if bf16_model else (model, "bfloat16", None),
        "minillm int8": (model, activations, "int8"),
        "minillm int4": (model, activations, "int4"),
    }


def step_bytes(llm: LLM) -> int:
    """Bytes one decode step reads: every matrix once (packed or quantized forms included), norms and
    biases; the embedding table only where it is also the output projection in its own form."""
    model = llm.model
    embed = getattr(model.model.embed_tokens, "weight", None)  # None: a QuantizedEmbedding
    total = sum(p.nbytes for p in model.parameters() if p is not embed)
    total += sum(m.weight_bytes for m in model.modules() if isinstance(m, (PackedLinear, QuantizedLinear)))
    if getattr(model.lm_head, "weight", None) is embed is not None:
        total += embed.nbytes
    return total


def model_bytes(model) -> int:
    """Bytes of every tensor the model holds, each once (a tied head and table sharing one int8 matrix count
    once): parameters, buffers, and the packed weights and biases that are neither."""
    held = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():
        if isinstance(m, (PackedLinear, QuantizedLinear)):
            held.update({id(t): t for t in (getattr(m, "weight", None), m.bias) if t is not None})
    return sum(t.numel() * t.element_size() for t in held.values())


def model_resident_kib() -> int:
    """This process's anonymous resident memory (what it allocated) plus the resident pages of the safetensors
    files it maps (weights used in place), in KiB. Unlike VmRSS this leaves out the pages of torch's own
    libraries that loading happens to run for the first time (tens of MB of code)."""
    total, mapping = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address range, permissions, ..., path
            mapping = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:" and mapping.endswith(".safetensors"):
            total += int(fields[1])
    status = Path("/proc/self/status").read_text().splitlines()
    return total + int(next(line.split()[1] for line in status if line.startswith("RssAnon:")))


def load_figures(model: str, dtype: str, quantize: str | None) -> dict:
    """Load time and resident memory (VmRSS; peak: VmHWM) of a fresh process that loads the model with
    LLM.load; and, in another fresh process, what the model alone (loader.load_model: no tokenizer, no KV
    pool; after a first load of the bundled model in the same mode) adds to resident memory
    (model_resident_kib), against the bytes of the tensors it holds."""
    tools, root = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])
    torch_dtype = f"torch.{dtype}" if dtype else "None"
    head = (
        f"import sys, time; sys.path[:0] = [{root!r}, {tools!r}]\n"
        "import torch; from pathlib import Path; from minillm import LLM\n"
        "def kib(key): return next(l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key))\n"  # noqa: E501
    )
    whole = head + (
        f"before = kib('VmRSS:'); t = time.perf_counter(); llm = LLM.load({model!r}, dtype={dtype!r}, quantize={quantize!r})\n"  # noqa: E501
        "print(before, kib('VmHWM:'), kib('VmRSS:'), time.perf_counter() - t)"
    )
    alone = head + (
        "from minillm.model.config import load_config; from minillm.loading.loader import load_model\n"
        "from bench_decode import model_bytes, model_resident_kib\n"
        # A first load costs about 66 MB that a second does not (torch's threads, Python modules,
        # kernels' first use: measured with the 5 MB bundled model); so load that one first.
        "from minillm.llm import bundled_model; tiny = bundled_model()\n"
        f"warm = load_model(tiny, load_config(tiny), {torch_dtype}, 'cpu', None, {quantize!r})\n"
        f"folder = Path({model!r}); config = load_config(folder); before = model_resident_kib()\n"
        f"m = load_model(folder, config, {torch_dtype}, 'cpu', None, {quantize!r})\n"
        "print(before, model_resident_kib(), model_bytes(m))"
    )
    out = subprocess.run([sys.executable, "-c", whole], capture_output=True, text=True, check=True)
    before, peak, now, seconds = out.stdout.split()
    out = subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True, check=True)
    model_before, model_after, held = map(int, out.stdout.split())
    model_rss = (model_after - model_before) * 1024
    return {
        "load_s": round(float(seconds), 2),
        "rss_before_load_bytes": int(before) * 1024,
        "peak_rss_bytes": int(peak) * 1024,
        "rss_after_load_bytes": int(now) * 1024,
        "model_rss_bytes": model_rss,
        "model_tensor_bytes": held,
        "model_rss_over_tensor_bytes": round(model_rss / held, 3),
    }


def write_report(report: dict, out: Path | None) -> None:
    """Print a benchmark's JSON report, and write it to `out` too when given (the other tools use it)."""
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text + "\n")
    print(text)


def machine_kind() -> str:
    """Which kind of x86 machine this is: its vendor (linear_f32 takes AVX-512 by default on Intel only) and the
    features the kernels and PyTorch's paths depend on."""
    flags = compiled.cpu_flags()
    vendor = "unknown vendor"
    try:
        text = Path("/proc/cpuinfo").read_text()
        vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(text.split("vendor_id")[1].split()[1], vendor)
    except (OSError, IndexError):
        pass
    if "avx512_bf16" in flags:
        kind = "AVX-512 with bf16 dot products" + (" and AMX" if "amx_bf16" in flags else "")
    elif "avx512f" in flags:
        kind = "AVX-512 (no bf16)"
    else:
        kind = "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{vendor}, {kind}"


def llama_bench(binary: str, gguf: Path, threads: int, flags: list[str]) -> float:
    out = subprocess.run(
        [binary, "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *flags],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench_decode: llama-bench failed on {gguf}: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (tools/make_bench_checkpoint.py)")
    parser.add_argument("--bf16-model", help="the same weights stored in bf16 (the bf16 row loads it)")
    parser.add_argument("--gguf-dir", type=Path, help="folder with the GGUF files named above")
    parser.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    modes = minillm_modes(args.model, args.bf16_model)
    llms = {}
    for name, (model, dtype, quantize) in modes.items():
        llms[name] = LLM.load(model, dtype=dtype, quantize=quantize)
        llms[name].defaults.eos_token_ids = []
    peers = {}
    if args.llama_bench and args.gguf_dir:
        peers = {name: args.gguf_dir / file for name, file in LLAMA.items() if (args.gguf_dir / file).is_file()}
    if not peers:
        print("bench_decode: llama.cpp skipped (no llama-bench or no GGUF files; see README)", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    vocab = min(150000, next(iter(llms.values())).config.vocab_size)
    decode_prompt = torch.randint(1000, vocab, (128,), generator=g).tolist()
    prefill_prompt = torch.randint(1000, vocab, (512,), generator=g).tolist()

    def decode(name: str) -> float:
        if name == "read_bandwidth":
            return read_bandwidth_gbs()
        if name in peers:
            return llama_bench(args.llama_bench, peers[name], args.threads, ["-p", "0", "-n", "64"])
        c = llms[name].generate(decode_prompt, max_new_tokens=64, temperature=0, use_prefix_cache=False)
        return c.decode_tok_s

    def prefill(name: str) -> float:
        if name in peers:
            return llama_bench(args.llama_bench, peers[name], args.threads, ["-p", "512", "-n", "0", "--repack", "0"])
        c = llms[name].generate(prefill_prompt, max_new_tokens=1, temperature=0, use_prefix_cache=False)
        return len(prefill_prompt) / c.prefill_s

    engines = list(llms) + list(peers)
    start = time.perf_counter()
    decode_runs = interleaved(engines + ["read_bandwidth"], decode, args.repeats)
    prefill_runs = interleaved(engines, prefill, args.repeats)
    bandwidths = decode_runs.pop("read_bandwidth")
    rows = {}
    for name in engines:
        row = {
            "decode_tok_s": round(max(decode_runs[name]), 2),
            "decode_per_round": [round(v, 2) for v in decode_runs[name]],
            "prefill_512_tok_s": round(max(prefill_runs[name]), 1),
            "prefill_per_round": [round(v, 1) for v in prefill_runs[name]],
        }
        if name in llms:
            row["step_bytes"] = step_bytes(llms[name])
            shares = [t * row["step_bytes"] / (b * 1e9) for t, b in zip(decode_runs[name], bandwidths)]
            row["share_of_bound"] = round(max(shares), 3)
        rows[name] = row
    ratios = {}
    for ours, peer in PEERS:
        if peer in rows:
            ratios[f"{ours} / {peer}"] = {
                "decode": round(rows[ours]["decode_tok_s"] / rows[peer]["decode_tok_s"], 3),
                "prefill": round(rows[ours]["prefill_512_tok_s"] / rows[peer]["prefill_512_tok_s"], 3),
            }
    for mode in ("int8", "int4"):
        ratios[f"minillm {mode} / minillm bf16, decode"] = round(
            rows[f"minillm {mode}"]["decode_tok_s"] / rows["minillm bf16"]["decode_tok_s"], 3
        )
    bench_seconds = time.perf_counter() - start
    llms.clear()
    for name, (model, dtype, quantize) in modes.items():
        rows[name].update(load_figures(model, dtype, quantize))
        rows[name]["load"] = {"model": model, "dtype": dtype, "quantize": quantize}
    version = None
    if peers:
        v = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
        version = (v.stdout + v.stderr).strip().splitlines()[:1]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu": machine_kind(),
            "compiled_kernels": compiled.available(),
            "threads": args.threads,
            "torch": torch.__version__,
            "llama.cpp": version,
        },
        "model": args.model,
        "read_bandwidth_GBs": [round(b, 1) for b in bandwidths],
        "bench_seconds": round(bench_seconds),
        "rows": rows,
        "ratios": ratios,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
