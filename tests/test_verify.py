"""python -m minillm verify: passes on sound checkpoints, and fails, naming the check, when a bug is planted."""

import json

import pytest

from minillm.cache.radix_cache import RadixCache
from minillm.cli import main


def run_verify(capsys, *args):
    capsys.readouterr()
    status = main(["verify", "--json", *args])
    report = json.loads(capsys.readouterr().out)
    return status, {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_verify_passes_on_a_hub_style_folder(checkpoint, capsys, family):
    status, checks = run_verify(capsys, "--model", str(checkpoint(family)))
    assert status == 0 and set(checks.values()) == {"pass"}
    assert set(checks) == {"parity", "cache", "chunked", "batched", "exact", "kv_bytes"}


def test_verify_passes_on_the_bundled_model(capsys):
    status, checks = run_verify(capsys, "--prompts", "2")
    assert status == 0 and set(checks.values()) == {"pass"}


def test_a_planted_rope_bug_fails_parity(checkpoint, capsys, monkeypatch):
    import minillm.model.model as model

    real = model.apply_rotary
    monkeypatch.setattr(model, "apply_rotary", lambda x, cos, sin: real(x, cos, -sin))  # rotates the wrong way
    status, checks = run_verify(capsys, "--model", str(checkpoint("llama")))
    assert status == 1 and checks["parity"] == "fail"


def test_a_planted_cache_bug_fails_the_cache_checks(checkpoint, capsys, monkeypatch):
    real = RadixCache.match_prefix

    def off_by_one(self, *args, **kwargs):
        match = real(self, *args, **kwargs)
        match.slots = match.slots.roll(1)  # hands back the right slots in the wrong order
        return match

    monkeypatch.setattr(RadixCache, "match_prefix", off_by_one)
    status, checks = run_verify(capsys, "--model", str(checkpoint("llama")))
    assert status == 1 and checks["cache"] == "fail" and checks["exact"] == "fail"
    assert checks["parity"] == "pass"


def test_verify_reads_as_a_report(checkpoint, capsys):
    capsys.readouterr()
    assert main(["verify", "--model", str(checkpoint("qwen2")), "--prompts", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.count("PASS") == 6 and "OK: 6 of 6" in out.err


def test_without_transformers_parity_is_skipped_with_a_note(checkpoint, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    status, checks = run_verify(capsys, "--model", str(checkpoint("llama")), "--prompts", "2")
    assert status == 0 and checks["parity"] == "skip" and set(checks.values()) == {"pass", "skip"}
