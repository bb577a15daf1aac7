"""Adapter packages: validation, refusal reasons, and loading onto a real tiny base."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from service.adapters.registry import AdapterRegistry
from service.base_model import load_base
from service.errors import AdapterUnavailable, NotFoundError
from tests.factories import make_lora_adapter


@pytest.fixture
def adapter_dir(tiny, tmp_path):
    target = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, target)
    return target


def registry(tiny, directory) -> AdapterRegistry:
    reg = AdapterRegistry(directory, base_id="tiny", base_fingerprint=tiny.fingerprint)
    reg.scan()
    return reg


def status(reg):
    return {r.name: (r.status, r.error) for r in reg._records.values()}


def test_valid_packages_are_ready(tiny, adapter_dir):
    reg = registry(tiny, adapter_dir)
    assert [r.name for r in reg.ready()] == ["alpha", "beta"]


def test_missing_directory_serves_base_only(tiny, tmp_path):
    assert registry(tiny, tmp_path / "nope").ready() == []


def test_pickle_weights_are_refused(tiny, adapter_dir):
    (adapter_dir / "alpha" / "adapter_model.bin").write_bytes(b"not really")
    s = status(registry(tiny, adapter_dir))
    assert s["alpha"][0] == "failed" and "pickle" in s["alpha"][1]
    assert s["beta"][0] == "ready"


def test_fingerprint_mismatch_is_refused_naming_both(tiny, adapter_dir, caplog):
    doc = json.loads((adapter_dir / "beta" / "hotswap.json").read_text())
    doc["base_model"] = {"id": "other-base", "fingerprint": "hsfp1:" + "0" * 64}
    (adapter_dir / "beta" / "hotswap.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR):
        s = status(registry(tiny, adapter_dir))
    assert s["beta"][0] == "failed"
    line = next(r.getMessage() for r in caplog.records if "beta" in r.getMessage())
    assert "other-base" in line and "hsfp1:" + "0" * 64 in line and tiny.fingerprint in line


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: (d / "hotswap.json").write_text("{broken"), "not valid JSON"),
        (lambda d: (d / "hotswap.json").unlink(), "missing hotswap.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
        (
            lambda d: (d / "hotswap.json").write_text(
                json.dumps({**json.loads((d / "hotswap.json").read_text()), "name": "other"})
            ),
            "differs from the directory name",
        ),
    ],
)
def test_broken_packages_are_refused_and_others_still_serve(tiny, adapter_dir, mutate, reason):
    mutate(adapter_dir / "alpha")
    s = status(registry(tiny, adapter_dir))
    assert s["alpha"][0] == "failed" and reason in s["alpha"][1]
    assert s["beta"] == ("ready", None)


def test_bad_directory_names_are_refused(tiny, adapter_dir):
    shutil.copytree(adapter_dir / "alpha", adapter_dir / "Bad Name")
    s = status(registry(tiny, adapter_dir))
    assert s["Bad Name"][0] == "failed" and "invalid adapter name" in s["Bad Name"][1]


def test_unloadable_weights_fail_one_adapter_only(tiny, adapter_dir, tmp_path, cache_dir):
    # An adapter for a differently shaped model: right fingerprint, wrong tensor shapes.
    from tests.factories import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=3)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    model.save_pretrained(other)
    make_lora_adapter(other, adapter_dir / "gamma", fingerprint=tiny.fingerprint, seed=4)

    reg = registry(tiny, adapter_dir)
    base = load_base(str(tiny.base_dir), quantization="fp32", device="cpu", cache_dir=cache_dir)
    model = reg.attach(base.model)
    s = status(reg)
    assert s["gamma"][0] == "failed" and "cannot be loaded" in s["gamma"][1]
    assert s["alpha"][0] == s["beta"][0] == "ready"
    assert set(model.peft_config) == {"alpha", "beta"}
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), adapter_names=["alpha"])


def test_get_explains_unavailable_adapters(tiny, adapter_dir):
    (adapter_dir / "alpha" / "hotswap.json").unlink()
    reg = registry(tiny, adapter_dir)
    with pytest.raises(AdapterUnavailable, match="not available: missing hotswap.json"):
        reg.get("alpha")
    with pytest.raises(NotFoundError, match="does not exist"):
        reg.get("zeta")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rank_pattern", {"([\\w.]+)+!": 8}),  # review M7: exponential in Python's re
        ("alpha_pattern", {"q_proj|(a+)+$": 16}),
        ("target_modules", ".*(q|v)_proj"),  # a regex string
        ("target_modules", ["q_proj", "(a+)+"]),
        ("layers_pattern", "(layers)+"),
    ],
)
def test_packages_whose_module_names_are_regexes_are_refused(tiny, adapter_dir, key, value):
    """PEFT matches these as regexes under the GIL; a package could freeze the process."""
    config_file = adapter_dir / "alpha" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, key: value}))
    state, error = status(registry(tiny, adapter_dir))["alpha"]
    assert state == "failed" and key in error
