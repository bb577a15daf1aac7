"""A few real training steps on a tiny model, through the same code path as the shipped runs."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from service.adapters.manifest import AdapterManifest
from service.adapters.registry import AdapterRegistry
from tests.support import free_port
from training.config import build_config
from training.evaluation import marketmail_verdict
from training.recipes import DOLLY_TEMPLATE, MARKETMAIL_SCHEMA
from training.train import run

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Summarize the context.", "LoRA adapters are small."),
    ("Write a subject line.", "New: Hello there"),
]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("train")
    data = root / "dolly.jsonl"
    with data.open("w") as fh:
        for i in range(48):
            instruction, response = FACTS[i % len(FACTS)]
            fh.write(
                json.dumps({"instruction": instruction, "context": "", "response": response, "category": "qa"}) + "\n"
            )
    out = root / "tiny-dolly"
    config = build_config(
        "dolly",
        out,
        overrides={
            "data": {"source": str(data), "eval_size": 8},
            "model": {
                "base": str(tiny.base_dir),
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "cache_dir": cache_dir,
            },
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]},
            "train": {
                "max_steps": 12,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "save_steps": 6,
                "eval_steps": 4,
                "logging_steps": 2,
                "max_length": 128,
            },
        },
    )
    metrics = run(config)
    return out, metrics, config


def test_training_lowers_the_held_out_loss(trained):
    _, metrics, _ = trained
    assert metrics["eval_loss_adapter"] < metrics["eval_loss_base"] * 0.8


def test_training_log_shows_the_loss_falling(trained):
    out, _, _ = trained
    history = json.loads((out / "training_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    # eval during training, safely, on its own cadence (eval_steps 4, checkpoints every 6)
    assert [h["step"] for h in history if "eval_loss" in h] == [4, 8, 12]


def test_package_is_complete_and_serves(trained, tiny):
    out, metrics, _ = trained
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "hotswap.json"}
    assert not list(out.glob("*.bin"))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) > 1 and targets == sorted(targets)  # PEFT writes its set in hash order
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero
    manifest = AdapterManifest.read(out)
    assert manifest.prompt_template == DOLLY_TEMPLATE
    assert manifest.base_model.fingerprint == tiny.fingerprint
    assert manifest.training["dataset_sha256"] and manifest.training["libraries"]["peft"]
    assert manifest.training["hyperparameters"]["lora"]["r"] == 4
    assert manifest.training["attention"] == "eager"  # the dolly preset's, recorded
    assert manifest.metrics["eval_loss_adapter"] == metrics["eval_loss_adapter"]
    registry = AdapterRegistry(out.parent, base_id="tiny", base_fingerprint=tiny.fingerprint)
    registry.scan()
    assert [r.name for r in registry.ready()] == ["tiny-dolly"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_training_loader_uses_the_configured_attention(tiny, cache_dir, attention):
    from training.config import ModelConfig
    from training.model import load_base_for_training

    config = ModelConfig(base=str(tiny.base_dir), quantization="nf4", attention=attention, cache_dir=cache_dir)
    model, *_ = load_base_for_training(config)
    assert model.config._attn_implementation == attention


def test_adapter_trains_in_fp32_on_a_quantized_base(tiny, cache_dir, tmp_path):
    # trl's SFTTrainer casts the trainable weights of a quantized model to bf16, where AdamW
    # loses every update below half a bf16 step of the weight; the trainer keeps them fp32.
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from training.config import LoraSettings, ModelConfig
    from training.model import add_lora, load_base_for_training
    from training.trainer import ResponseOnlyTrainer

    base, tokenizer, _, _ = load_base_for_training(
        ModelConfig(base=str(tiny.base_dir), quantization="nf4", compute_dtype="bf16", cache_dir=cache_dir)
    )
    model = add_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]))
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        bf16=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    data = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    trainer = ResponseOnlyTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}


def test_resume_and_eval_only(trained):
    out, metrics, config = trained
    checkpoints = sorted(config.checkpoint_dir.glob("checkpoint-*"))
    assert checkpoints, "checkpoints are written for --resume"
    again = run(config, eval_only=True)
    # The run evaluates the package as written, loaded afresh: --eval-only measures the same thing.
    assert {k: again[k] for k in ("eval_loss_base", "eval_loss_adapter")} == {
        k: metrics[k] for k in ("eval_loss_base", "eval_loss_adapter")
    }
    assert AdapterManifest.read(out).training["steps"] == 12  # eval-only keeps the run's record
    import dataclasses

    on_fp32 = dataclasses.replace(config, model=dataclasses.replace(config.model, quantization="fp32"))
    run(on_fp32, eval_only=True)
    kept = AdapterManifest.read(out).metrics
    assert kept["eval_loss_adapter"] == pytest.approx(metrics["eval_loss_adapter"], abs=1e-3)
    assert kept["on_fp32"]["eval_loss_adapter"] < kept["on_fp32"]["eval_loss_base"]


@pytest.mark.parametrize(
    ("text", "ok", "why"),
    [
        ('{"subject": "Lamp sale", "body": "b", "call_to_action": "Buy"}', True, "ok"),
        ('{"subject": "Sale", "body": "the LAMP is here", "call_to_action": "Buy"}', True, "ok"),
        ('{"subject": "Sale", "body": "b", "call_to_action": "Buy"}', False, "product not named"),
        ('{"subject": "Lamp", "body": "b"}', False, "schema"),
        ('{"subject": "Lamp", "body": "b", "call_to_action": "x", "extra": 1}', False, "schema"),
        ("Subject: Lamp", False, "not JSON"),
    ],
)
def test_marketmail_verdict(text, ok, why):
    verdict, reason = marketmail_verdict(text, "Lamp", MARKETMAIL_SCHEMA)
    assert verdict is ok and reason.startswith(why)


def test_two_process_data_parallel_run_on_cpu(tiny, tmp_path, cache_dir):
    """Two ranks train data-parallel (gloo on CPU) on the same batches as one process would; rank 0
    alone evaluates and writes the package.

    `accelerate launch --multi_gpu` starts ranks with torch.distributed.run, used here directly:
    accelerate's own CPU multi-process launch needs MPI (`mpirun`), which this machine lacks.
    """
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": q, "context": "", "response": a * (1 + i % 3)}) + "\n"
            for i, (q, a) in enumerate(FACTS * 8)
        )
    )
    args = [
        "-m",
        "training",
        "dolly",
        "--data",
        str(data),
        "--eval-size",
        "4",
        "--base-model",
        str(tiny.base_dir),
        "--quantization",
        "fp32",
        "--cache-dir",
        str(cache_dir),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-targets",
        "q_proj",
        "v_proj",
        "--max-length",
        "96",
        "--loss-weighting",
        "token",
        "--logging-steps",
        "1",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    two, one = tmp_path / "two-dolly", tmp_path / "one-dolly"
    for cmd in (launch + [*args, "--output-dir", str(two)], [sys.executable, *args, "--output-dir", str(one)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    manifest = AdapterManifest.read(two)
    assert manifest.training["processes"] == 2
    assert AdapterManifest.read(one).training["processes"] == 1
    assert (two / "adapter_model.safetensors").is_file()

    # Each step's gradient is the one process's, batch for batch: the ranks split each batch of 4
    # and DDP averages their gradients. (Ranks whose gradients were not synced each stepped on
    # their own half batch: norms 10-20% off.)
    def grad_norms(out):
        return [h["grad_norm"] for h in json.loads((out / "training_log.json").read_text()) if "grad_norm" in h]

    assert len(grad_norms(two)) == 4
    assert grad_norms(two) == pytest.approx(grad_norms(one), rel=2e-3)


def test_loss_plot_is_drawn_from_the_run_log(trained, tmp_path):
    from training.plot import loss_curves, plot

    out, _, _ = trained
    train, evals = loss_curves(json.loads((out / "training_log.json").read_text()))
    assert len(train) >= 3 and evals
    png = plot(out, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_running_mean_of_the_training_loss_looks_back_only():
    from training.plot import running_mean

    points = [(5, 4.0), (10, 2.0), (15, 6.0), (20, 0.0)]
    assert running_mean(points, 2) == [(5, 4.0), (10, 3.0), (15, 4.0), (20, 3.0)]
    assert running_mean(points, 1) == points


def test_greedy_under_the_service_grammar_writes_what_the_schema_allows(tiny):
    """schema_rates' `adapter_grammar` column decodes as the service enforces a JSON adapter."""
    import json

    import jsonschema
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.grammar import GrammarCompiler
    from training.evaluation import greedy

    small = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
        "required": ["ok", "n"],
    }
    model = AutoModelForCausalLM.from_pretrained(tiny.base_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)
    grammar = GrammarCompiler(tokenizer).compile_now(small)
    free = greedy(model, tokenizer, ["Product: lamp", "a much longer prompt than that"], 40)
    constrained = greedy(model, tokenizer, ["Product: lamp", "a much longer prompt than that"], 40, grammar=grammar)
    for text in constrained:
        jsonschema.validate(json.loads(text), small)
    assert constrained != free  # the random model's own text is no such JSON


def test_a_warm_start_begins_from_the_packages_weights_and_shape(trained, tmp_path):
    """--init-adapter: the run starts from the package's LoRA (not PEFT's zero B) with its shape,
    whatever the recipe says, and records where it started."""
    import dataclasses

    out, metrics, config = trained
    start = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in start.items() if "lora_B" in k)  # a fresh start differs
    warm = dataclasses.replace(
        config,
        output_dir=tmp_path / "tiny-dolly",
        lora=dataclasses.replace(config.lora, r=8, alpha=16, targets=["all-linear"], init=str(out)),
        # one step at a negligible rate: what it trains from is what it ends with
        train=dataclasses.replace(config.train, max_steps=1, learning_rate=1e-9, save_steps=1, eval_steps=1),
    )
    again = run(warm)
    end = load_file(warm.output_dir / "adapter_model.safetensors")
    assert end.keys() == start.keys()
    assert all((end[k] - start[k]).abs().max() < 1e-5 for k in start)
    assert again["eval_loss_adapter"] == pytest.approx(metrics["eval_loss_adapter"], abs=1e-3)
    lora = AdapterManifest.read(warm.output_dir).training["hyperparameters"]["lora"]
    assert (lora["r"], lora["alpha"], lora["init"]) == (4, 8, str(out))
    assert lora["targets"] == ["q_proj", "up_proj", "v_proj"]


def test_a_warm_start_from_a_package_for_another_base_or_nowhere_is_refused(trained, tiny, tmp_path, cache_dir):
    from service.adapters.sources import SourceError
    from service.base_model import resolve_source
    from training.model import init_adapter

    out, _, config = trained
    source = resolve_source(str(tiny.base_dir), cache_dir)
    other = tmp_path / "other"
    other.mkdir()
    for file in out.iterdir():
        if file.is_file():
            (other / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((other / "hotswap.json").read_text())
    manifest["base_model"]["fingerprint"] = "hsfp1:" + "0" * 64
    (other / "hotswap.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match="--init-adapter .*fingerprint"):
        init_adapter(str(other), source, config.lora, tmp_path / "work")
    with pytest.raises(SourceError, match="--init-adapter"):
        init_adapter(str(tmp_path / "absent"), source, config.lora, tmp_path / "work")
    with pytest.raises(SourceError, match="--init-adapter"):
        init_adapter("ftp://nowhere/x", source, config.lora, tmp_path / "work")
