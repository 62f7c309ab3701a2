"""python -m minillm generate: streaming text on stdout, timings on stderr, --json, --chat."""

import json
import subprocess
import sys

from minillm import LLM
from minillm.cli import main


def test_generate_streams_text_and_reports_timings(checkpoint, capsys):
    folder = checkpoint("llama")
    expected = LLM.load(folder).generate("The quick", max_new_tokens=12, temperature=0)
    assert main(["generate", "--model", str(folder), "-n", "12", "--temperature", "0", "The quick"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert "prompt tokens" in err and "prefill" in err and "decode" in err and "tok/s" in err


def test_json_output_one_object_per_prompt(checkpoint, capsys):
    folder = checkpoint("qwen2")
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--json",
                "-n",
                "5",
                "--seed",
                "3",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--top-p",
                "0.9",
                "--min-p",
                "0.01",
                "--repetition-penalty",
                "1.1",
                "--stop",
                "zzz",
                "first prompt",
                "second",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert {"text", "token_ids", "prompt_tokens", "finish_reason", "timings"} <= set(record)
        assert len(record["token_ids"]) <= 5 and record["finish_reason"] in ("stop", "length")
        assert {"prefill_tok_s", "decode_tok_s", "ttft_s"} <= set(record["timings"])


def test_chat_flag_applies_the_template(checkpoint, capsys):
    folder = checkpoint("qwen2")
    llm = LLM.load(folder)
    ids = llm.tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    expected = llm.generate(ids, max_new_tokens=6, temperature=0)
    capsys.readouterr()
    assert (
        main(["generate", "--model", str(folder), "--system", "Be brief.", "--json", "-n", "6", "-t", "0", "hi"]) == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["prompt_tokens"] == len(ids) and record["token_ids"] == expected.token_ids


def test_package_imports_without_test_libraries():
    """minillm must not need transformers, hypothesis or pytest at run time."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'hypothesis', 'pytest'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import minillm, minillm.cli, minillm.llm, minillm.engine.engine\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_several_prompts_share_the_cache_and_report_it(checkpoint, tmp_path, capsys):
    folder = checkpoint("llama")
    doc = "The quick brown fox jumps over the lazy dog. " * 4
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": doc + q}) for q in ["Who?", "Why?", "When?"]) + "\n")
    capsys.readouterr()
    assert (
        main(["generate", "--model", str(folder), "--json", "-n", "3", "-t", "0", "--prompts-file", str(prompts)]) == 0
    )
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 3
    assert records[0]["cached_tokens"] == 0
    for r in records[1:]:
        assert r["cached_tokens"] > 30 and r["cached_tokens"] + r["computed_tokens"] == r["prompt_tokens"]
        assert r["ttft_s"] > 0
    assert "hit rate" in err and "prefill saved" in err
    text_file = tmp_path / "prompts.txt"
    text_file.write_text(f"{doc}Who?\n\n{doc}Why?\n")
    assert (
        main(["generate", "--model", str(folder), "-n", "2", "--no-prefix-cache", "--prompts-file", str(text_file)])
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("(0 cached,") == 2 and "hit rate" not in err


def test_bad_prompts_file(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    capsys.readouterr()
    assert main(["generate", "--model", str(checkpoint("llama")), "--prompts-file", str(bad)]) == 2
    assert "line 2: expected a JSON object with a 'prompt' field" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint("llama")), "--prompts-file", str(tmp_path / "none")]) == 2
    assert "cannot read prompts file" in capsys.readouterr().err


def test_chat_reuses_the_conversation_each_turn(checkpoint, monkeypatch, capsys):
    import io

    folder = checkpoint("qwen2")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand a second question\n\nthird\n/exit\nnever read\n"))
    capsys.readouterr()
    assert main(["chat", "--model", str(folder), "--system", "Be brief.", "-n", "8", "-t", "0"]) == 0
    out, err = capsys.readouterr()
    turns = [line for line in err.splitlines() if line.startswith("[turn")]
    assert len(turns) == 3
    reused = [int(t.split("reused ")[1].split(" ")[0]) for t in turns]
    assert reused[0] == 0 and reused[1] > 10 and reused[2] > reused[1]


def test_prompts_run_concurrently_with_the_same_output_in_any_batch_and_order(checkpoint, capsys):
    folder = str(checkpoint("llama"))
    prompts = ["The quick brown fox", "The quick brown dog", "def add(a, b):", "In the beginning"]
    outputs = []
    for flags in (
        ["--max-batch", "1"],
        ["--max-batch", "16"],
        ["--max-batch", "2", "--schedule", "fcfs"],
        ["--max-prefill-tokens", "3"],  # every prompt over several steps
        ["--kv-mb", "0.05"],
    ):  # a pool of about 100 tokens: eviction and preemption
        capsys.readouterr()
        assert main(["generate", "--model", folder, "--json", "-n", "12", "-t", "0", *flags, *prompts]) == 0
        outputs.append([json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()])
    assert all(o == outputs[0] for o in outputs) and len(outputs[0]) == 4


def test_chat_on_the_bundled_model_as_readme_shows_it(monkeypatch, capsys):
    """`python -m minillm chat` with no --model: the bundled code model's template writes messages as comments."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("list the files in a folder\nnow sort them\n"))
    capsys.readouterr()
    assert main(["chat", "--system", "You are terse.", "-n", "8", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert len([line for line in err.splitlines() if line.startswith("[turn")]) == 2
    llm = LLM.load()
    text = llm.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be\nbrief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x = 1"},
            {"role": "user", "content": "more"},
        ]
    )
    assert text == "# Be\n# brief.\n# hi\nx = 1\n\n\n# more\n"


def test_a_built_wheel_carries_the_bundled_model(tmp_path):
    """`pip install .` (not -e) must give a package that finds its default model outside the checkout."""
    import importlib.util
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here, so no wheel can be built without the network")
    root = Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("minillm-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "minillm" / "weights" / "model.safetensors").is_file()
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    code = "import minillm.llm as m; print(m.__file__); print(m.bundled_model())"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.splitlines() == [str(target / "minillm" / "llm.py"), str(target / "minillm" / "weights")]
    run = subprocess.run(
        [sys.executable, "-m", "minillm", "generate", "-n", "4", "-t", "0", "def f("],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0 and run.stdout.strip(), run.stderr  # a continuation was printed


def test_speculation_flags_keep_the_output_and_report_the_drafts(checkpoint, capsys):
    """--speculate draft with the checkpoint itself as the draft model: every greedy guess is right, the text
    is exact mode's plain text, and the per-prompt line counts the drafted tokens."""
    folder = checkpoint("llama")
    expected = LLM.load(folder, exact=True).generate("The quick", max_new_tokens=16, temperature=0)
    argv = ["generate", "--model", str(folder), "--exact", "-n", "16", "--temperature", "0", "The quick"]
    assert main(argv + ["--speculate", "draft", "--draft-model", str(folder), "--num-draft-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert " drafted accepted" in err
    assert main(argv + ["--speculate", "lookup", "--draft-model", str(folder)]) == 2
    assert "only with speculate 'draft'" in capsys.readouterr().err
