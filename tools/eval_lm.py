"""lm-evaluation-harness through minillm's server: a multiple-choice task scored as lm-eval scores any OpenAI-
compatible server, then every item's log-likelihoods checked against the engine's own (LLM.prompt_logprobs).

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]"   # not in CI
    python tools/eval_lm.py --lm-eval /tmp/lmeval/bin/lm_eval --out bench/lm_eval_smollm2.json       # ~2 min

lm-eval's `local-completions` model asks /v1/completions for each (question, choice) pair with echo: true,
logprobs: 1 and max_tokens: 1, sending token ids (tokenized by the model's own tokenizer.json, which
transformers reads from the converted folder), and sums the logprobs of the choice's tokens. The task is
tools/lm_eval_task (40 one-line facts, four choices each). The server runs SmolLM2 (--model, any minillm model
works) in float32 on 127.0.0.1, started and stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm import LLM  # noqa: E402
from minillm.loading.loader import resolve_model_dir  # noqa: E402

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_task"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def pairs(sample: dict) -> list[tuple[str, str]]:
    """A logged sample's (context, continuation) requests, one per choice."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):  # lm-eval >= 0.4.3: {"gen_args_0": {"arg_0": context, "arg_1": continuation}}
        return [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
    return [tuple(a) for a in arguments]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command (from its own venv)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = resolve_model_dir(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "minillm", "serve", "--model", str(folder), "--dtype", "float32", "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, server)
        with tempfile.TemporaryDirectory() as out_dir:
            model_args = (
                f"model={folder},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={folder},"
                "tokenized_requests=True,num_concurrent=1,max_retries=1"
            )
            start = time.perf_counter()
            done = subprocess.run(
                [
                    args.lm_eval,
                    "run",
                    "--model",
                    "local-completions",
                    "--model_args",
                    model_args,
                    "--tasks",
                    "minillm_facts",
                    "--include_path",
                    str(TASK_DIR),
                    "--log_samples",
                    "--output_path",
                    out_dir,
                ],
                cwd=TASK_DIR,  # the task's data_files path is relative to it
                capture_output=True,
                text=True,
                env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
            )
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
            results = json.loads(next(Path(out_dir).rglob("results_*.json")).read_text())
            samples = [json.loads(line) for f in Path(out_dir).rglob("samples_*.jsonl") for line in f.open()]
    finally:
        server.terminate()
        server.wait(timeout=60)
    # Each item's log-likelihoods, recomputed in this process from the engine's logits on the same tokens.
    llm = LLM.load(folder, dtype="float32")
    worst, checked = 0.0, 0
    for sample in samples:
        for (context, continuation), response in zip(pairs(sample), sample["resps"]):
            loglikelihood = float(response[0][0])
            whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
            context_ids = llm.tokenizer.encode(context, add_special_tokens=False)
            items = llm.prompt_logprobs(whole)
            ours = sum(i.logprob for i in items[len(context_ids) :])
            worst, checked = max(worst, abs(ours - loglikelihood)), checked + 1
    metrics = results["results"]["minillm_facts"]
    report = {
        "model": args.model,
        "task": "tools/lm_eval_task/facts.yaml (40 items, 4 choices)",
        "lm_eval": results.get("lm_eval_version") or results.get("versions"),
        "acc": metrics.get("acc,none"),
        "acc_stderr": metrics.get("acc_stderr,none"),
        "acc_norm": metrics.get("acc_norm,none"),
        "loglikelihoods_checked": checked,
        "largest_difference_to_llm_logits": worst,
        "seconds": round(seconds, 1),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if worst > 1e-5:
        raise SystemExit(f"lm-eval's log-likelihoods differ from LLM.prompt_logprobs by {worst:.2e} (limit 1e-5)")


if __name__ == "__main__":
    main()
