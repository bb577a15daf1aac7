from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import make_parser, overrides_from
from training.config import build_config
from training.presets import PRESETS


def test_preset_then_file_then_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train:\n  max_steps: 7\n  learning_rate: 0.01\nlora:\n  r: 4\n")
    args = make_parser().parse_args(["schema", "--steps", "3", "--lora-alpha", "8"])
    config = build_config("schema", tmp_path / "out", config_file=config_file, overrides=overrides_from(args))
    assert config.train.max_steps == 3  # flag beats file
    assert config.train.learning_rate == 0.01  # file beats preset
    assert (config.lora.r, config.lora.alpha) == (4, 8)
    assert config.model.quantization == "int8"  # the schema preset's 8-bit base
    assert config.data.source == "data/schema/marketmail.jsonl"


def test_dolly_default_is_qlora_nf4_on_all_linear_layers(tmp_path):
    config = build_config("dolly", tmp_path / "dolly")
    assert config.model.quantization == "nf4" and config.lora.targets == ["all-linear"]
    assert config.model.attention == "eager"  # what the shipped adapter was trained with
    args = make_parser().parse_args(["dolly", "--attention", "sdpa"])
    assert build_config("dolly", tmp_path / "d", overrides=overrides_from(args)).model.attention == "sdpa"
    assert config.checkpoint_dir == tmp_path / ".dolly-checkpoints"


def test_seed_presets_carry_the_seed_recipes(tmp_path):
    llama = build_config("dolly", tmp_path / "a", preset_name="seed-openllama-7b")
    assert llama.model.base == "openlm-research/open_llama_7b_v2"
    assert (llama.train.learning_rate, llama.train.max_grad_norm, llama.train.max_length) == (2e-4, 0.3, 512)
    assert llama.train.optimizer == "paged_adamw_32bit" and llama.train.scheduler == "constant_with_warmup"
    bloom = build_config("schema", tmp_path / "b", preset_name="seed-bloomz-3b")
    assert (bloom.model.quantization, bloom.lora.r, bloom.lora.alpha, bloom.train.max_steps) == ("int8", 16, 32, 100)
    assert bloom.lora.targets == ["query_key_value"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("train:\n  max_stepz: 3\n", "unknown key train.max_stepz"),
        ("optimizer:\n  lr: 1\n", "unknown section"),
        ("train:\n  max_steps: 0\n", "max_steps must be positive"),
        ("lora:\n  dropout: 1.5\n", "dropout"),
        ("model:\n  attention: flash\n", "model.attention"),
        ("train:\n  eval_steps: 0\n", "eval_steps must be positive"),
        ("train:\n  scheduler: cosine_forever\n", "train.scheduler 'cosine_forever'"),
        ("train:\n  scheduler: warmup_stable_decay\n", "num_decay_steps"),
        ("train:\n  scheduler_kwargs: {num_cycles: 0.5, decay: 3}\n", "decay"),
        ("train:\n  scheduler_kwargs: [60]\n", "scheduler_kwargs must be a mapping"),
    ],
)
def test_bad_configs_are_refused_clearly(tmp_path, doc, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(doc)
    with pytest.raises(ValueError, match=message):
        build_config("dolly", tmp_path / "dolly", config_file=config_file)


def test_unknown_preset_or_task_pairing():
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("dolly", Path("x"), preset_name="nope")
    with pytest.raises(ValueError, match="no 'schema' recipe"):
        build_config("schema", Path("x"), preset_name="seed-openllama-7b")
    assert set(PRESETS) == {"default", "seed-openllama-7b", "seed-bloomz-3b"}


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, training.cli as c; c.make_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cli_reports_data_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"product": "x", "description": "y", "output": {}}\n{oops\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "schema",
            "--data",
            str(bad),
            "--output-dir",
            str(tmp_path / "s"),
            "--base-model",
            "no-such-dir-or-hub-id",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert f"{bad}:2: malformed JSON" in out.stderr


def test_rslora_neftune_and_the_schedule_reach_peft_and_trl(tmp_path):
    from training.model import lora_config
    from training.train import _trainer_args

    flags = ["dolly", "--rslora", "--neftune-alpha", "5", "--scheduler", "constant_with_warmup", "--warmup-steps", "3"]
    config = build_config("dolly", tmp_path / "dolly", overrides=overrides_from(make_parser().parse_args(flags)))
    assert lora_config(config.lora).use_rslora is True
    args = _trainer_args(config, "cpu", has_eval=False)
    assert args.neftune_noise_alpha == 5 and args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 3
    plain = build_config("dolly", tmp_path / "plain")
    assert plain.train.scheduler_kwargs == {} and _trainer_args(plain, "cpu", False).lr_scheduler_kwargs == {}
    assert (
        lora_config(plain.lora).use_rslora is False and _trainer_args(plain, "cpu", False).neftune_noise_alpha is None
    )


def test_a_warmup_stable_decay_schedule_reaches_the_trainer_with_its_arguments(tmp_path):
    """The schedule's own arguments come from the config file; the trainer's schedule holds the
    peak through the stable phase and decays over the last `num_decay_steps` only."""
    import torch
    from transformers import get_scheduler

    from training.train import _trainer_args

    config_file = tmp_path / "wsd.yaml"
    config_file.write_text(
        "train:\n  scheduler: warmup_stable_decay\n  max_steps: 100\n  warmup_steps: 10\n"
        "  scheduler_kwargs: {num_decay_steps: 20, min_lr_ratio: 0.1}\n"
    )
    config = build_config("dolly", tmp_path / "dolly", config_file=config_file)
    args = _trainer_args(config, "cpu", has_eval=False)
    assert args.lr_scheduler_kwargs == {"num_decay_steps": 20, "min_lr_ratio": 0.1}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=10,
        num_training_steps=100,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(100):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[5] < 1.0 and rates[10:80] == [1.0] * 70  # warm-up, then the stable phase at the peak
    assert rates[90] < 1.0 and abs(rates[99] - 0.1) < 0.02  # the decay, to min_lr_ratio of the peak
