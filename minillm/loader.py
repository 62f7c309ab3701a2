"""From a folder (or a Hub id) of published files to a CausalLM with its weights in place.

Weights are read with safetensors (a JSON header of names, dtypes, shapes and byte offsets, then raw data:
nothing is executed, unlike pickle). A large checkpoint is sharded: model.safetensors.index.json maps each
tensor name to the file holding it. Every tensor the model needs must be there with the right shape; a
checkpoint that does not fit the config is refused instead of silently producing garbage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import MinillmError
from .model import CausalLM

# What generation needs from a Hub repo: never *.bin, *.pth, or Mistral's duplicate consolidated.safetensors.
HUB_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Tensors some checkpoints carry that are not weights (the RoPE frequencies are recomputed from config).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def resolve_model_dir(model: str) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the local Hub cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MinillmError(f"{model} is a file; pass the folder that holds config.json and the weights")
    if not HUB_ID.fullmatch(model):
        raise MinillmError(f"model folder {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo, network error: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinillmError(
            f"{model!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason}); pass the path of a downloaded checkpoint folder"
        ) from None


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """file -> names to read from it (None: all). Sharded checkpoints read only what the index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MinillmError(f"{index} is not a valid safetensors index ({e!r})") from None
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(folder / file, []).append(name)
        for file in files:
            if not file.is_file():
                raise MinillmError(f"{file} is listed in {index.name} but missing; download the checkpoint again")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return {single: None}
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
    hint = f" (found {', '.join(others)}: pickle checkpoints are not loaded; convert them to safetensors)" if others else ""
    raise MinillmError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name, in its stored dtype. safe_open memory-maps each file."""
    tensors: dict[str, torch.Tensor] = {}
    for file, names in _weight_files(folder).items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names if names is not None else f.keys():
                    if IGNORED.fullmatch(name):
                        continue
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise MinillmError(f"{file} is not a valid safetensors file ({e}); download it again") from None
    return tensors


def load_model(folder: Path, config: ModelConfig, dtype: torch.dtype | None, device: str = "cpu") -> CausalLM:
    """Build the model without allocating weights (meta device), then install the checkpoint's tensors."""
    tensors = read_tensors(folder)
    embed = tensors.get("model.embed_tokens.weight")
    if dtype is None:  # the checkpoint's own dtype: as declared, else as stored
        dtype = config.dtype or (embed.dtype if embed is not None else torch.float32)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    if config.tie_word_embeddings:
        # The output projection is the embedding matrix itself; a separate copy must agree with it.
        head = tensors.pop("lm_head.weight", None)
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise MinillmError("config.json ties lm_head to embed_tokens, but the checkpoint holds a different lm_head.weight")
        del expected["lm_head.weight"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MinillmError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}; is config.json from this checkpoint?")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise MinillmError(f"checkpoint has {len(unexpected)} tensor(s) the config does not explain, e.g. {unexpected[0]}; is config.json from this checkpoint?")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise MinillmError(f"tensor {name} has shape {list(tensors[name].shape)} but config.json implies {list(shape)}")
    state = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, not two copies
    return model.eval()
