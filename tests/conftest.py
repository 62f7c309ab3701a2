import os

# Tests never reach the Hugging Face Hub: every checkpoint is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402

import pytest  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, **options) -> folder of a tiny random checkpoint, built once per session."""
    built = {}

    def get(family="llama", **options):
        key = (family, json.dumps(options, sort_keys=True, default=str))
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp(family), family, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def load(checkpoint):
    """load(family, dtype=None, engine=None, **options) -> minillm.LLM on that checkpoint, loaded once per
    session; every call gives it a fresh engine (empty prefix cache), with `engine` as LLM.configure options."""
    from minillm import LLM

    loaded = {}

    def get(family="llama", dtype=None, engine=None, **options):
        key = (family, str(dtype), json.dumps(options, sort_keys=True, default=str))
        if key not in loaded:
            loaded[key] = LLM.load(checkpoint(family, **options), dtype=dtype)
        loaded[key].configure(**(engine or {}))
        return loaded[key]

    return get
