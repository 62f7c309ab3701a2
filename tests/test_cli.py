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
    assert main(["generate", "--model", str(folder), "--json", "-n", "5", "--seed", "3", "--temperature", "0.9",
                 "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1",
                 "--stop", "zzz", "first prompt", "second"]) == 0
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
    assert main(["generate", "--model", str(folder), "--system", "Be brief.", "--json", "-n", "6", "-t", "0", "hi"]) == 0
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
        "import minillm, minillm.cli, minillm.engine\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
