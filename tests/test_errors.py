"""Bad input: one clear line naming the problem, exit status 2 from the CLI, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm import LLM, MinillmError
from minillm.cli import main


def broken_copy(checkpoint, tmp_path, family="llama"):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint(family), folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


BREAKAGES = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "no tokenizer.json": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
        "not a valid safetensors file",
    ),
    "corrupt weights": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}garbage"),
        "not a valid safetensors file",
    ),
    "wrong shape": (
        lambda f: edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(65)})),
        r"model.norm.weight has shape \[65\]",
    ),
    "missing tensor": (
        lambda f: edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "lacks 1 tensor",
    ),
    "unsupported architecture": (
        lambda f: edit_json(f / "config.json", architectures=["GPT2LMHeadModel"]),
        "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM",
    ),
    "unsupported rope": (
        lambda f: edit_json(f / "config.json", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
        "unsupported RoPE scaling type 'longrope'",
    ),
    "bad config json": (lambda f: (f / "config.json").write_text("{oops"), "not valid JSON"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_checkpoints(case, checkpoint, tmp_path, capsys):
    folder = broken_copy(checkpoint, tmp_path)
    breakage, message = BREAKAGES[case]
    breakage(folder)
    with pytest.raises(MinillmError, match=message):
        LLM.load(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm: error: ") and err.count("\n") == 1 and "Traceback" not in err


REQUESTS = {
    "prompt too long": (dict(prompt=[5] * 256), "prompt has 256 tokens but the model's context holds 256"),
    "empty prompt": (dict(prompt=""), "prompt is empty"),
    "max_new_tokens < 1": (dict(prompt="hi", max_new_tokens=0), "max_new_tokens must be >= 1"),
    "max_new_tokens not an int": (dict(prompt="hi", max_new_tokens=2.5), "max_new_tokens must be an integer"),
    "negative temperature": (dict(prompt="hi", temperature=-1.0), "temperature must be >= 0"),
    "temperature not a number": (dict(prompt="hi", temperature="0.5"), "temperature must be a number"),
    "top_p zero": (dict(prompt="hi", top_p=0.0), "top_p must be > 0 and <= 1"),
    "top_p above one": (dict(prompt="hi", top_p=1.5), "top_p must be > 0 and <= 1"),
    "seed above 64 bits": (dict(prompt="hi", seed=2**64), "seed must be >= .* and <= 18446744073709551615"),
    "seed below 64 bits": (dict(prompt="hi", seed=-(2**63) - 1), "seed must be >= -9223372036854775808"),
    "logprobs above 20": (dict(prompt="hi", logprobs=21), "logprobs must be >= 0 and <= 20"),
    "stop not a string": (dict(prompt="hi", stop=[3]), "stop must be a string or a list of strings"),
    "stop too long": (dict(prompt="hi", stop="x" * 1025), "at most 1024 characters"),
    "ignore_eos not a flag": (dict(prompt="hi", ignore_eos="yes"), "ignore_eos must be True or False"),
    "token id outside vocab": (dict(prompt=[5, 100000]), "outside the vocabulary"),
    "token ids as floats": (dict(prompt=[5.0, 6.0]), "a prompt must be text or a list of token ids"),
    "a prompt of another type": (dict(prompt={"text": "hi"}), "a prompt must be text or a list of token ids"),
    "text far beyond the context": (dict(prompt="word " * 400_000), "bytes of text, far more than"),
}


@pytest.mark.parametrize("case", REQUESTS)
def test_bad_requests(case, load):
    request, message = REQUESTS[case]
    with pytest.raises(MinillmError, match=message):
        load("llama").stream(**request)  # refused before anything runs


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "2"], "top_p"),
        (["--seed", str(2**64)], "seed"),
        (["--stop", "x" * 1025], "stop"),
        ([], None),
    ],
)
def test_cli_bad_sampling_flags_and_long_prompt(flags, message, checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint("llama"))] + flags
    args += ["hi"] if message else ["word " * 300]  # no flag problem: the prompt is too long
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm: error: ") and err.count("\n") == 1
    assert (message or "shorten it") in err


def test_missing_folder_and_unreachable_hub(capsys):
    with pytest.raises(MinillmError, match="does not exist"):
        LLM.load("./no/such/folder")
    # HF_HUB_OFFLINE is set by conftest: the Hub cannot be reached, as on a machine without network.
    with pytest.raises(MinillmError, match="could not be fetched from the Hugging Face Hub.*local"):
        LLM.load("no-such-org/no-such-model")
    capsys.readouterr()
    assert main(["generate", "--model", "no-such-org/no-such-model", "hi"]) == 2
    assert "Hugging Face Hub" in capsys.readouterr().err


def test_cli_process_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minillm", "generate", "--model", str(tmp_path / "nope"), "hi"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("minillm: error:") and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_tied_checkpoint_with_a_different_lm_head_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "tied"
    shutil.copytree(checkpoint("qwen2", tie_word_embeddings=True), folder)
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(MinillmError, match="ties lm_head"):
        LLM.load(folder)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-batch", "0"], "max_batch must be at least 1"),
        (["--kv-mb", "0.0001"], "the KV pool must hold at least 2 tokens"),
        (["--kv-mb", "0.01"], "but the KV pool (raise --kv-mb) holds"),
    ],
)
def test_bad_engine_settings(flags, message, checkpoint, capsys):
    capsys.readouterr()
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    assert main(["generate", "--model", str(checkpoint("llama")), *flags, prompt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm: error: ") and message in err and err.count("\n") == 1
