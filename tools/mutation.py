"""Mutation testing: plant small bugs in the core modules and count how many the test suite catches.

mutmut rewrites each function of a module into many mutants (`<` for `<=`, `+ 1` for `+ 2`, a dropped
argument, ...) and runs the tests that cover that function against each one. A mutant the tests fail on is
killed; one they pass on survived, and is either a missing test or an equivalent mutant (a change that
cannot alter behaviour, such as a different default that every caller overrides). Equivalent mutants are
listed, one line each with the reason, in tests/equivalent_mutants.txt; the score leaves them out:

    score = killed / (mutants - equivalent)

Each module runs in its own copy of the repository (mutmut needs a scratch tree) with only the test files
that exercise it, not the whole suite per mutant. Even so a module takes 5 to 90 minutes on two cores (each
surviving mutant runs all of its tests; the Hypothesis batching tests dominate), the whole set about four
hours: it stays out of CI, and a stopped run continues with --resume. Usage:

    python tools/mutation.py                      # every core module, writes bench/mutation.json
    python tools/mutation.py cache.radix_cache engine.sampling  # some modules (merged into bench/mutation.json)
    python tools/mutation.py --resume engine.scheduler  # a run stopped midway: its untested mutants and survivors
    python tools/mutation.py --survivors          # after a run: each surviving mutant's diff
    python tools/mutation.py --rescore            # after adding lines to tests/equivalent_mutants.txt
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tests" / "equivalent_mutants.txt"

# module -> the test files that exercise it (the mutants of a function run only the tests that cover it).
# Tests that start other Python processes are left out: those processes import the unmutated package. They
# are picked by name: such a test says "process" in its name (and, in the files run with this filter, no
# other test does).
NO_SUBPROCESS = ["-k", "not process"]
MODULE_TESTS = {  # modules by their path in the package: engine.scheduler is minillm/engine/scheduler.py
    "cache.radix_cache": ["tests/test_radix_cache.py"],
    "engine.scheduler": [
        "tests/test_scheduler.py",
        "tests/test_batching.py",
        "tests/test_disk_cache.py",
        *NO_SUBPROCESS,
    ],
    "engine.kv_manager": [
        "tests/test_scheduler.py",
        "tests/test_batching.py",
        "tests/test_disk_cache.py",
        "tests/test_isolation.py",
        *NO_SUBPROCESS,
    ],
    "cache.disk_cache": ["tests/test_disk_cache.py", *NO_SUBPROCESS],
    "cache.kv_pool": ["tests/test_kv_pool.py", "tests/test_scheduler.py", "tests/test_batching.py"],
    "engine.plan": ["tests/test_exact.py", "tests/test_kv_pool.py", "tests/test_batching.py"],
    "engine.exact": ["tests/test_exact.py"],
    "engine.sampling": ["tests/test_sampling.py", "tests/test_isolation.py"],
    "model.rope": ["tests/test_rope.py"],
    "model.model": ["tests/test_parity.py", "tests/test_kv_pool.py", "tests/test_prefix_cache.py"],
    "engine.forward_batch": ["tests/test_kv_pool.py", "tests/test_batching.py"],
    "engine.engine": ["tests/test_scheduler.py", "tests/test_batching.py", "tests/test_isolation.py"],
    "engine.request": ["tests/test_batching.py", "tests/test_text.py", "tests/test_isolation.py"],
}

STATUS_KILLED = {"killed", "timeout", "segfault"}  # mutmut's verdicts that mean the tests caught the mutant


def load_equivalent() -> dict[str, str]:
    """tests/equivalent_mutants.txt: `mutant_name  # reason` per line; blank lines and # comments skipped."""
    listed = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition("#")
            listed[name.strip()] = reason.strip()
    return listed


def scratch_tree(workdir: Path, module: str, resume: bool) -> Path:
    """A copy of the tracked files with a [tool.mutmut] section for this module. resume: keep mutmut's state
    (mutants/) from an earlier run and refresh the files, its copies of the tests included."""
    tree = workdir / module
    if tree.exists() and not resume:
        shutil.rmtree(tree)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("bench/"):
            continue
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
        if resume and name.startswith("tests/") and (tree / "mutants").exists():
            shutil.copy2(ROOT / name, tree / "mutants" / name)
    tests = ", ".join(json.dumps(t) for t in MODULE_TESTS[module])
    with open(tree / "pyproject.toml", "a") as f:
        f.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["minillm"]\n'
            'also_copy = ["weights"]\n'  # the bundled model, which some tests load
            f'only_mutate = ["minillm/{module.replace(".", "/")}.py"]\n'
            f"pytest_add_cli_args_test_selection = [{tests}]\n"
            'process_isolation = "forkserver"\n'  # torch is not fork-safe once its thread pool has run
        )
    return tree


def unfinished(tree: Path, module: str) -> list[str]:
    """After an earlier run: the mutants it did not reach and those that survived it and are not listed as
    equivalent (to try against the tests as they are now)."""
    meta = tree / "mutants" / "minillm" / f"{module.replace('.', '/')}.py.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    equivalent = load_equivalent()
    return [name for name, code in codes.items() if code is None or (code == 0 and name not in equivalent)]


def run_module(workdir: Path, module: str, jobs: int, resume: bool) -> dict:
    tree = scratch_tree(workdir, module, resume)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    names = unfinished(tree, module) if resume else []
    tried = set()
    while True:
        run = subprocess.run(
            ["mutmut", "run", "--max-children", str(jobs), *names], cwd=tree, env=env, capture_output=True, text=True
        )
        if run.returncode != 0:
            sys.exit(f"mutmut failed on {module}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        # Functions edited since the earlier run got new mutants, which the names given did not cover.
        tried |= set(names)
        names = [n for n in unfinished(tree, module) if n not in tried] if names else []
        if not names:
            break
    seconds = time.perf_counter() - start
    listing = subprocess.run(
        ["mutmut", "results", "--all", "true"], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    statuses = dict(re.findall(r"^\s*(\S+): (.+)$", listing.stdout, re.M))
    return {"statuses": statuses, "seconds": round(seconds, 1)}


def summarize(module: str, mutants: int, escaped: list[str], stale: list[str], equivalent: dict[str, str]) -> dict:
    """escaped: the mutants the tests did not kill; stale: listed as equivalent, yet killed."""
    marked = [n for n in escaped if n in equivalent]
    scored = mutants - len(marked)
    killed = mutants - len(escaped)
    return {
        "mutants": mutants,
        "killed": killed,
        "equivalent": len(marked),
        "survived": [n for n in escaped if n not in equivalent],
        "escaped": escaped,
        "score": round(killed / scored, 4) if scored else 1.0,
        "killed_but_listed_equivalent": stale,
    }


def rescore(module: str, entry: dict, equivalent: dict[str, str]) -> dict:
    """Score a recorded run again against the current equivalent list (after reading its survivors)."""
    escaped = entry.get("escaped")
    if escaped is None:  # recorded before "escaped" was: survivors plus the ones then listed (and not killed)
        listed = [
            n
            for n in equivalent
            if n.startswith(f"minillm.{module}.") and n not in entry["killed_but_listed_equivalent"]
        ]
        escaped = sorted(set(entry["survived"]) | set(listed))
    scored = ("mutants", "killed", "equivalent", "survived", "escaped", "score", "killed_but_listed_equivalent")
    kept = {k: v for k, v in entry.items() if k not in scored}  # seconds, tests, notes
    return summarize(module, entry["mutants"], escaped, entry["killed_but_listed_equivalent"], equivalent) | kept


def print_row(module: str, r: dict) -> None:
    print(
        f"{module:14s} {r['killed']:4d}/{r['mutants'] - r['equivalent']:4d} killed ({r['equivalent']} equivalent)  "
        f"score {r['score']:.1%}  survived {len(r['survived'])}  {r.get('seconds') or 0:.0f} s",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULE_TESTS)}")
    parser.add_argument("--workdir", default="/tmp/minillm-mutation", help="scratch trees, one per module")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--out", default=str(ROOT / "bench" / "mutation.json"))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a module's stopped run: its untested mutants and its survivors, with the current tests",
    )
    parser.add_argument(
        "--survivors", action="store_true", help="print the diff of each surviving mutant of the last run"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="no run: score the recorded runs again against tests/equivalent_mutants.txt",
    )
    args = parser.parse_args()
    modules = args.modules or list(MODULE_TESTS)
    unknown = [m for m in modules if m not in MODULE_TESTS]
    if unknown:
        sys.exit(f"unknown module(s) {unknown}; choose from {list(MODULE_TESTS)}")
    if shutil.which("mutmut") is None:
        sys.exit("mutmut is not installed: pip install -e '.[dev]'")
    workdir, out = Path(args.workdir), Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    equivalent = load_equivalent()

    if args.survivors:
        for module in modules:
            for name in report.get(module, {}).get("survived", []):
                diff = subprocess.run(["mutmut", "show", name], cwd=workdir / module, capture_output=True, text=True)
                print(diff.stdout)
        return

    for module in [] if args.rescore else modules:
        result = run_module(workdir, module, args.jobs, args.resume)
        report = json.loads(out.read_text()) if out.exists() else {}  # another run may have written meanwhile
        equivalent = load_equivalent()
        if args.resume and module in report:
            result["seconds"] += report[module].get("seconds") or 0
        statuses = result["statuses"]
        escaped = sorted(n for n, s in statuses.items() if s not in STATUS_KILLED)
        stale = [n for n in equivalent if n.startswith(f"minillm.{module}.") and statuses.get(n) in STATUS_KILLED]
        report[module] = summarize(module, len(statuses), escaped, stale, equivalent) | {
            "seconds": result["seconds"],
            "tests": MODULE_TESTS[module],
        }
        out.write_text(json.dumps(report, indent=1) + "\n")
        print_row(module, report[module])
    if args.rescore:
        report = {m: rescore(m, entry, equivalent) for m, entry in report.items()}
        out.write_text(json.dumps(report, indent=1) + "\n")
        for m, entry in report.items():
            print_row(m, entry)
    total = [report[m] for m in MODULE_TESTS if m in report]
    killed = sum(r["killed"] for r in total)
    scored = sum(r["mutants"] - r["equivalent"] for r in total)
    print(f"{'all':14s} {killed:4d}/{scored:4d} killed  score {killed / scored:.1%}")


if __name__ == "__main__":
    main()
