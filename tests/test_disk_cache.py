"""The disk tier of the prefix cache: KV written when it leaves memory, reused by later engines and processes,
and never trusted when a file is damaged, foreign or half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import LLM
from minillm.cache.disk_cache import page_keys
from minillm.cli import main as cli

DOC = " ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(5))
QUESTIONS = [DOC + " Question: who jumps?", DOC + " Question: what is lazy?"]
GREEDY = dict(max_new_tokens=6, temperature=0)


def page_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/*.safetensors"))


@pytest.fixture
def llm(checkpoint):
    model = LLM.load(checkpoint("llama"))
    yield model
    model.close()


def reference(llm, prompt):
    llm.configure(prefix_cache=False)
    return llm.generate(prompt, **GREEDY)


def test_a_second_engine_reuses_the_first_ones_kv_from_disk(llm, tmp_path):
    expected = reference(llm, QUESTIONS[1])
    llm.configure(cache_dir=tmp_path)
    assert llm.generate(QUESTIONS[0], **GREEDY).cached_tokens == 0
    llm.close()  # the end of the first "process": the tree's KV goes to disk
    files = page_files(tmp_path)
    assert files and all(not f.name.startswith(".") for f in files)
    llm.configure(cache_dir=tmp_path)  # a fresh engine: empty pool, empty tree
    again = llm.generate(QUESTIONS[1], **GREEDY)
    shared = len(os.path.commonprefix([llm.prompt_ids(q) for q in QUESTIONS]))
    assert again.cached_tokens == shared // 64 * 64 > 0  # every whole page of the shared document
    assert again.token_ids == expected.token_ids
    llm.prefix_cache.check_invariants()


def test_evicted_kv_comes_back_from_disk_in_the_same_engine(llm, tmp_path):
    expected = reference(llm, QUESTIONS[0])
    n = len(llm.prompt_ids(QUESTIONS[0]))
    llm.configure(cache_dir=tmp_path, kv_tokens=n + 40, poison_freed=True)  # room for one request at a time
    llm.generate(QUESTIONS[0], **GREEDY)
    llm.generate(" ".join(["other words"] * 8), **GREEDY)  # evicts the document, which is written to disk
    assert page_files(tmp_path)
    again = llm.generate(QUESTIONS[0], **GREEDY)
    assert again.cached_tokens >= 64 and again.token_ids == expected.token_ids
    llm.engine.scheduler.check_invariants()


@pytest.mark.parametrize("length, cached", [(63, 0), (64, 0), (65, 64), (128, 64), (129, 128)])
def test_the_disk_lookup_stops_short_of_the_last_token_at_page_edges(llm, tmp_path, length, cached):
    """A page is reused only if it ends before the prompt's last token (whose logits must be computed), and
    lengths around a page edge look up no page that the prompt does not fill."""
    prompt = list(range(2, 2 + length))
    expected = llm.generate(prompt, **GREEDY)
    llm.configure(cache_dir=tmp_path)
    llm.generate(prompt, **GREEDY)
    llm.close()
    llm.configure(cache_dir=tmp_path)
    again = llm.generate(prompt, **GREEDY)
    assert again.cached_tokens == cached and again.token_ids == expected.token_ids


def damage(path: Path, how: str, other: Path, foreign: Path) -> None:
    if how == "corrupted":
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # a byte of the tensors
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "swapped":  # another prefix's page under this name
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    elif how == "foreign":  # a page written for other weights (another fingerprint), same prefix
        path.write_bytes(foreign.read_bytes())
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["corrupted", "truncated", "swapped", "foreign", "empty"])
def test_a_damaged_file_is_skipped_with_a_warning_and_removed(llm, checkpoint, tmp_path, capfd, how):
    expected = reference(llm, QUESTIONS[1])
    foreign_dir = tmp_path / "foreign"
    other = LLM.load(checkpoint("llama", seed=1), cache_dir=foreign_dir)
    other.generate(QUESTIONS[0], **GREEDY)
    other.close()
    llm.configure(cache_dir=tmp_path / "kv")
    llm.generate(QUESTIONS[0], **GREEDY)
    llm.close()
    files = page_files(tmp_path / "kv")
    assert len(files) >= 2
    target = files[0]
    foreign = next(f for f in page_files(foreign_dir) if f.name != target.name)  # a page of the other model
    damage(target, how, files[1], foreign)
    capfd.readouterr()
    llm.configure(cache_dir=tmp_path / "kv")
    again = llm.generate(QUESTIONS[1], **GREEDY)
    warning = capfd.readouterr().err
    assert again.token_ids == expected.token_ids
    assert warning.count("minillm: disk cache: skipping") >= 1 and "Traceback" not in warning
    assert len(warning.strip().splitlines()) <= 2  # one line per bad file
    # removed (close() writes the page again, sound); of two swapped pages, the lookup stops at the first
    assert not target.exists() or (how == "swapped" and not files[1].exists())


def test_the_directory_stays_within_its_budget_trimming_prefixes_from_their_end(llm, tmp_path):
    """Four documents of two pages each, a budget of three pages: the directory fits, and every page left is
    reachable (its parent page is there too)."""
    prompts = [f"{i} " + DOC for i in range(4)]
    llm.configure(cache_dir=tmp_path, disk_cache_mb=0.1)
    for prompt in prompts:
        llm.generate(prompt, **GREEDY)
    llm.close()
    files = page_files(tmp_path)
    assert 0 < sum(f.stat().st_size for f in files) <= 0.1 * 2**20
    disk = llm.engine.kv.disk
    shape = tuple(llm.engine.pool.keys.shape[:2]) + (64, llm.config.head_dim)
    reachable = sum(len(disk.read(ids, 0, len(ids) // 64, shape, llm.dtype)) for ids in map(llm.prompt_ids, prompts))
    assert reachable == len(files) >= 2


def test_an_unusable_directory_turns_the_tier_off_with_one_warning(llm, tmp_path, capfd):
    expected = reference(llm, QUESTIONS[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    llm.configure(cache_dir=blocker / "kv")
    assert llm.generate(QUESTIONS[0], **GREEDY).token_ids == expected.token_ids
    llm.close()
    err = capfd.readouterr().err
    assert err.count("minillm: disk cache: turned off") == 1 and "Traceback" not in err


def test_fingerprints_keep_settings_apart(checkpoint, tmp_path):
    folder = checkpoint("llama")
    for options in ({}, {"dtype": "bfloat16"}, {"exact": True}, {"prepack": False}):
        llm = LLM.load(folder, cache_dir=tmp_path, **options)
        llm.generate(QUESTIONS[0], **GREEDY)
        llm.close()
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 4


SCRIPT = """
import json, sys, torch
from minillm import LLM
folder, cache_dir, prompt, out = sys.argv[1:5]
llm = LLM.load(folder, exact=True, cache_dir=cache_dir)
c = llm.generate(prompt, max_new_tokens=6, temperature=0, return_logits=True)
torch.save(c.logits, out)
print(json.dumps({"cached": c.cached_tokens, "tokens": c.token_ids}))
"""


def run_process(folder, cache_dir, prompt, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(cache_dir), prompt, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_exact_mode_logits_are_bitwise_equal_across_processes(checkpoint, tmp_path):
    folder = checkpoint("llama")
    cold = run_process(folder, tmp_path / "none", QUESTIONS[1], tmp_path / "cold.pt")
    first = run_process(folder, tmp_path / "kv", QUESTIONS[0], tmp_path / "first.pt")
    warm = run_process(folder, tmp_path / "kv", QUESTIONS[1], tmp_path / "warm.pt")
    assert cold["cached"] == first["cached"] == 0 and warm["cached"] >= 64
    assert warm["tokens"] == cold["tokens"]
    assert torch.equal(torch.load(tmp_path / "warm.pt"), torch.load(tmp_path / "cold.pt"))


def test_two_processes_writing_one_directory_at_once_leave_it_sound(checkpoint, tmp_path):
    folder = checkpoint("llama")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(folder), str(tmp_path), prompt, str(tmp_path / f"{i}.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, prompt in enumerate([QUESTIONS[0], QUESTIONS[0] + " And again?"])
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporary file left behind
    llm = LLM.load(folder, exact=True, cache_dir=tmp_path)
    disk = llm.engine.kv.disk
    shape = tuple(llm.engine.pool.keys.shape[:2]) + (64, llm.config.head_dim)
    expected = set()
    for prompt in (QUESTIONS[0], QUESTIONS[0] + " And again?"):  # every page of both prompts, each sound
        ids = llm.prompt_ids(prompt)
        expected |= set(page_keys(disk.facts["id"], ids, 64))
        assert len(disk.read(ids, 0, len(ids) // 64, shape, llm.dtype)) == len(ids) // 64
    assert {f.stem for f in page_files(tmp_path)} == expected


def test_cli_second_run_reuses_the_document_and_cache_info_clear(checkpoint, tmp_path, capsys):
    folder = str(checkpoint("llama"))
    kv = str(tmp_path / "kv")
    args = ["generate", "--model", folder, "-n", "4", "-t", "0", "--cache-dir", kv, "--json"]
    assert cli(args + [QUESTIONS[0]]) == 0
    assert "tokens written" not in capsys.readouterr().err
    assert cli(args + [QUESTIONS[1]]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["cached_tokens"] >= 64 and "[disk cache:" in err
    assert cli(["cache", "info", "--cache-dir", kv]) == 0
    info = capsys.readouterr().out
    assert "1 fingerprint(s)" in info and "pages" in info
    assert cli(["cache", "clear", "--cache-dir", kv]) == 0
    capsys.readouterr()
    assert page_files(Path(kv)) == []
    os.environ.pop("MINILLM_CACHE_DIR", None)
    assert cli(["cache", "info"]) == 2
    assert "pass --cache-dir" in capsys.readouterr().err


@pytest.mark.parametrize("split, length, cached", [(80, 201, 192), (127, 129, 128)])
def test_a_lookup_continues_on_disk_where_the_tree_ends(llm, tmp_path, split, length, cached):
    """The tree holds the first `split` tokens of a document (shared with another prompt), the disk the rest:
    a request takes both, mid-page (down to the last token of a page), and the lookup is counted once.
    Evicting the document's tail writes only the pages that reach into it: the shared part stays in memory."""
    doc = [(7 * i) % 300 + 2 for i in range(200)]
    prompt = doc[: length - 1] + [5]
    expected = reference(llm, prompt)
    llm.configure(cache_dir=tmp_path, poison_freed=True)
    s = llm.engine.kv
    llm.generate(doc + [4], **GREEDY)
    llm.generate(doc[:split] + [3] * 10, **GREEDY)  # splits the document's node after `split` tokens
    for _ in range(3):  # least recently used leaves first: the first request's tokens, then the document's tail
        if s.tree.match_length(doc + [5]) > split:
            s.pool.free(s.tree.evict(1, spill=s._spill))
    assert s.tree.match_length(doc + [5]) == split
    first_page = s.disk.dir / f"{page_keys(s.disk.facts['id'], doc, 64)[0]}.safetensors"
    assert not first_page.exists()  # tokens 0-63 are still in memory: not written
    lookups = s.tree.stats.lookups
    again = llm.generate(prompt, **GREEDY)
    assert again.cached_tokens == cached and again.token_ids == expected.token_ids
    assert s.tree.stats.lookups == lookups + 1
    llm.engine.scheduler.check_invariants()
