"""Base-model sources and quantization modes (tiny models; the embedded GGUF once)."""

from __future__ import annotations

import shutil

import pytest
import torch

import service.base_model as bm
from service.fingerprint import fingerprint_files, weight_files


def test_quantization_kwargs_follow_the_recipe():
    nf4 = bm.quantization_kwargs("nf4", "cpu")["quantization_config"]
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float32  # CPU computes in fp32
    assert bm.quantization_kwargs("int8", "cpu")["quantization_config"].load_in_8bit
    assert bm.quantization_kwargs("bf16", "cpu") == {"dtype": torch.bfloat16}
    assert bm.quantization_kwargs("fp32", "cpu") == {"dtype": torch.float32}
    with pytest.raises(ValueError):
        bm.quantization_kwargs("int3", "cpu")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "neither an existing directory"),
        ("embedded:gpt-9", "unknown embedded"),
        ("dummy:huge", "unknown dummy shape"),
    ],
)
def test_unknown_specs_fail_clearly(spec, message, tmp_path):
    with pytest.raises(bm.ModelSourceError, match=message):
        bm.resolve_source(spec, tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(bm.ModelSourceError, match="no config.json"):
        bm.resolve_source(str(tmp_path), tmp_path)


def test_hub_ids_take_the_hub_path_and_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(bm.ModelSourceError, match="cannot fetch 'org/not-cached'"):
        bm.resolve_source("org/not-cached", tmp_path)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "bf16", "fp32"])
def test_local_directory_loads_in_every_mode(tiny, cache_dir, quantization):
    base = bm.load_base(str(tiny.base_dir), quantization=quantization, device="cpu", cache_dir=cache_dir)
    assert base.source.served_id == tiny.base_dir.name
    assert base.source.fingerprint == tiny.fingerprint
    assert base.max_context == 256 and base.eos_token_ids == {base.tokenizer.eos_token_id}
    layer = type(base.model.model.layers[0].self_attn.q_proj).__name__
    assert layer == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}.get(quantization, "Linear")
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_fingerprint_changes_with_the_weights(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny.base_dir, copy)
    assert fingerprint_files(weight_files(copy)) == tiny.fingerprint
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    assert fingerprint_files(weight_files(copy)) != tiny.fingerprint


def test_embedded_model_converts_once_and_is_reused(cache_dir, monkeypatch):
    first = bm.resolve_source("embedded:smollm2-135m-instruct", cache_dir)
    assert (first.path / "model.safetensors").is_file()
    assert first.served_id == "smollm2-135m-instruct" and first.fingerprint.startswith("hsfp1:")

    def must_not_convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(bm, "_convert_gguf", must_not_convert)
    again = bm.resolve_source("embedded:smollm2-135m-instruct", cache_dir)
    assert again == first
    config = (first.path / "config.json").read_text()
    assert "quantization_config" not in config


def test_dummy_tiny_is_written_once_and_loads_quantized(cache_dir):
    source = bm.resolve_source("dummy:tiny", cache_dir)
    assert source.served_id == "dummy-tiny"
    assert bm.resolve_source("dummy:tiny", cache_dir).fingerprint == source.fingerprint
    base = bm.load_base("dummy:tiny", quantization="nf4", device="cpu", cache_dir=cache_dir)
    assert base.model.config.hidden_size == bm.DUMMY_SHAPES["tiny"]["hidden_size"]
    assert base.model.config.vocab_size == len(base.tokenizer)


def test_bundled_tokenizer_matches_the_embedded_one(cache_dir):
    """Clients (lm-evaluation-harness) load the asset directory as it is, with AutoTokenizer."""
    from transformers import AutoTokenizer

    bundled = AutoTokenizer.from_pretrained(bm.TOKENIZER_ASSET)
    embedded = AutoTokenizer.from_pretrained(bm.resolve_source("embedded:smollm2-135m-instruct", cache_dir).path)
    text = "The capital of France is Paris. 東京 😀 <|im_end|>"
    assert bundled(text).input_ids == embedded(text).input_ids
    assert bundled.eos_token_id == embedded.eos_token_id and len(bundled) == len(embedded)
    assert bundled.chat_template == embedded.chat_template


def test_the_int8_cast_notice_is_dropped_and_other_bitsandbytes_warnings_kept(caplog):
    import logging

    from service.base_model import quiet_int8_cast_warning

    quiet_int8_cast_warning()
    quiet_int8_cast_warning()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
