"""The package's shape: every module imports only modules that stand before it in the reading order below
(README's "How it works" follows it), so there is no import cycle and a reader can go top to bottom; every
module is in the order; and the package imports without the test and serving extras."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"

# Lower layers first: a module may import only modules listed before it.
# fmt: off
READING_ORDER = [
    "errors", "limits",
    "model.config", "model.rope", "model.tensor_parallel", "model.model",
    "kernels.compiled", "loading.safetensors_mmap", "loading.prepack", "loading.quantize", "loading.gguf_import",
    "loading.loader",
    "tokenizer",
    "cache.kv_pool", "cache.radix_cache", "cache.disk_cache",
    "engine.sampling", "engine.constraint", "engine.guidance", "engine.request", "engine.plan", "engine.kv_manager",
    "engine.scheduler",
    "engine.forward_batch", "engine.drafters", "engine.speculation", "engine.runner", "engine.exact", "engine.engine",
    "ranks", "options", "engine.build", "generation_config", "llm",
    "serving.openai_api", "serving.structured", "serving.metrics", "serving.handler", "serving.server",
    "verify", "perplexity", "flags", "cli",
]
# fmt: on
ENTRY_POINTS = ["__init__", "__main__"]  # above everything


def modules() -> dict[str, Path]:
    """Dotted name within the package (model.rope) -> file; package __init__ files are the folders' names."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] == "weights":
            continue
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules this one imports (anywhere in it: top level, functions, TYPE_CHECKING)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            stem = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                full = ".".join(stem + [alias.name])
                out.add(full if full in known else ".".join(stem))
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            out |= {n.removeprefix("minillm.") for n in names if n and n.startswith("minillm.")}
    return {m for m in out if m in known and m != name}


def test_every_module_imports_only_what_stands_before_it():
    found = modules()
    folders = {name for name in found if (PACKAGE / name.replace(".", "/")).is_dir()}
    listed = set(READING_ORDER) | set(ENTRY_POINTS)
    assert set(found) - folders == listed, "a module is missing from READING_ORDER, or listed but absent"
    rank = {name: i for i, name in enumerate(READING_ORDER + ENTRY_POINTS)}
    for name in sorted(set(found) - folders):
        for target in imports_of(name, found[name], set(found)):
            if target in folders:
                continue  # a folder's __init__ holds nothing to import
            assert rank[target] < rank[name], f"{name} imports {target}, which stands after it in the reading order"


def test_the_folders_hold_nothing_but_their_modules():
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert all(isinstance(n, ast.Expr) for n in tree.body), f"{init} should hold only its docstring"
