"""From a folder (or a Hub id) of published files to a CausalLM with its weights in place.

Weights are memory-mapped from safetensors files (safetensors_mmap.py), not copied. A large checkpoint is
sharded: model.safetensors.index.json maps each tensor name to the file holding it. Every tensor the model
needs must be there with the right shape; a checkpoint that does not fit the config is refused instead of
silently producing garbage. On CPU the matrices are then repacked for fast products (prepack.py), or held in
a compact form that the compiled kernels read (quantize.py): int8 or int4 when asked, and bf16 as stored on a
CPU without native bf16 arithmetic (AVX2), where a bf16 checkpoint then computes in float32 unless told.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import MinillmError
from ..kernels import compiled
from ..model.config import ModelConfig
from ..model.model import CausalLM
from ..model.tensor_parallel import TensorParallel
from . import gguf_import
from . import prepack as packing
from . import quantize as quantization
from .safetensors_mmap import SafetensorsFile

# What generation needs from a Hub repo: never *.bin, *.pth, or Mistral's duplicate consolidated.safetensors.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Tensors some checkpoints carry that are not weights (the RoPE frequencies are recomputed from config).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
log = logging.getLogger("minillm.loading")


def resolve_model_dir(model: str, dtype: torch.dtype | None = None) -> Path:
    """A local folder as is; a GGUF file or a named model (`smollm2`) as its converted folder (gguf_import.py,
    dequantized tensors written in dtype where that is bf16 or f16, else float32); otherwise a Hub repo id,
    downloaded (or found in the local Hub cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_import.cached_folder(path, dtype)
    if path.exists():
        raise MinillmError(f"{model} is a file; pass a .gguf file or the folder that holds config.json and the weights")
    if path.suffix.lower() == ".gguf":
        raise MinillmError(f"GGUF file {model} does not exist")
    alias = gguf_import.resolve_alias(model)
    if alias is not None:
        return gguf_import.cached_folder(alias, dtype)
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
    hint = (
        f" (found {', '.join(others)}: pickle checkpoints are not loaded; convert them to safetensors)"
        if others
        else ""
    )
    raise MinillmError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def read_tensors(files: list[SafetensorsFile], names: dict[Path, list[str] | None]) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint lists, by name, in its stored dtype: views of the mapped files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        wanted = names[file.path]
        for name in wanted if wanted is not None else file.tensors:
            if IGNORED.fullmatch(name):
                continue
            if name not in file.tensors:
                raise MinillmError(f"{file.path} lacks tensor {name}, which the index places there; download it again")
            tensors[name] = file.tensors[name]
    return tensors


def load_model(
    folder: Path,
    config: ModelConfig,
    dtype: torch.dtype | None,
    device: str = "cpu",
    prepack: bool | None = None,
    quantize: str | None = None,
    group_size: int = quantization.DEFAULT_GROUP_SIZE,
    tp: TensorParallel | None = None,
    exact: bool = False,
) -> CausalLM:
    """Build the model without allocating weights (meta device), then install the checkpoint's tensors.

    prepack: repack the matrices for oneDNN (prepack.py); None packs wherever that is available.
    quantize: "int8" or "int4" replaces the matrices by quantized ones instead (quantize.py).
    tp: this process's rank under tensor parallelism: it installs only its slices (tensor_parallel.py).
    exact: for exact mode (exact.py), whose products must give a row the same bits whatever the other rows
    hold: prepacked float32 weights then use oneDNN's layout too (prepack.py says why)."""
    names = _weight_files(folder)
    files = [SafetensorsFile(path) for path in names]
    tensors = read_tensors(files, names)

    def release(weight: torch.Tensor) -> None:  # its mapped pages are no longer needed in memory
        for file in files:
            file.release(weight)

    embed = tensors.get("model.embed_tokens.weight")
    stored = embed.dtype if embed is not None else torch.float32
    cpu_without_bf16 = torch.device(device).type == "cpu" and not packing.available(torch.bfloat16, device)
    if dtype is None:  # the checkpoint's own dtype: as declared, else as stored
        dtype = config.dtype or stored
        if dtype == torch.bfloat16 and cpu_without_bf16:
            dtype = torch.float32
            log.warning(
                "minillm: this CPU has no native bfloat16 arithmetic, so the bf16 checkpoint computes in float32 "
                "(weights kept in bf16 where the compiled kernels run); --dtype bfloat16 overrides"
            )
    # bf16 matrices on such a CPU: kept as they are and read by the compiled kernel, not PyTorch's slow bf16 path
    # (float32 activations: exact conversions, so the same products as float32 weights, at half the bytes).
    keep_bf16 = (
        quantize is None
        and prepack is None
        and cpu_without_bf16
        and (dtype == torch.bfloat16 or (dtype == torch.float32 and stored == torch.bfloat16))
        and compiled.available()
    )
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: p.shape for name, p in model.named_parameters()}  # the whole model's shapes
    if config.tie_word_embeddings:
        # The output projection is the embedding matrix itself; a separate copy must agree with it.
        head = tensors.pop("lm_head.weight", None)
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise MinillmError(
                "config.json ties lm_head to embed_tokens, but the checkpoint holds a different lm_head.weight"
            )
        if head is not None:
            release(head)
        del expected["lm_head.weight"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MinillmError(
            f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}; "
            "is config.json from this checkpoint?"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise MinillmError(
            f"checkpoint has {len(unexpected)} tensor(s) the config does not explain, e.g. {unexpected[0]}; "
            "is config.json from this checkpoint?"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise MinillmError(
                f"tensor {name} has shape {list(tensors[name].shape)} but config.json implies {list(shape)}"
            )
    if tp is not None and tp.size > 1:  # this rank's shapes, and its slice of every tensor
        with torch.device("meta"):
            model = CausalLM(config, tp)
        for name, t in list(tensors.items()):
            tensors[name] = tp.slice(name, t, config)
            if tensors[name].untyped_storage().data_ptr() != t.untyped_storage().data_ptr():  # a copy: t unused
                release(t)
    if quantize is not None:
        if prepack:
            raise MinillmError("quantized weights use their own kernels, not prepacked ones; drop prepack")
        quantization.check(quantize, group_size, model, dtype, device)
        prepack = False
    if keep_bf16:
        prepack = False
    if prepack is None:
        prepack = packing.available(dtype, device)
    if prepack and not packing.available(dtype, device):
        raise MinillmError(
            f"prepacked weights need a CPU build of torch with oneDNN and float32 or bfloat16 (got {dtype} on {device})"
        )
    # Matrices about to be packed or quantized stay as stored: that converts them one at a time, so a dtype
    # change never holds a converted copy of every weight at once.
    replaced = prepack or quantize is not None or keep_bf16
    as_stored = (
        {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)} if replaced else set()
    )
    if keep_bf16:  # the table becomes a bf16 one too (quantize_linears)
        as_stored.add("model.embed_tokens.weight")
    state = {}
    for name, t in tensors.items():
        state[name] = t if name in as_stored else t.to(device=device, dtype=dtype)
        if state[name] is not t:  # converted or moved: the mapped original is not needed in memory
            release(t)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one tensor, not two copies
    del tensors, state, embed  # only the model holds weights now, so packed originals can be freed
    if prepack:
        packing.prepack_linears(model, dtype, release, exact)
        model.weight_form = "prepacked"
    if quantize is not None:
        quantization.quantize_linears(model, quantize, dtype, group_size, release)
        model.weight_form = "q8_0" if quantize == "int8" else f"q4_1-g{group_size}-head-q8_0"
    if keep_bf16:
        quantization.quantize_linears(model, "bf16", dtype, release=release)
        model.weight_form = "bf16-kept"
    return model.eval()
