"""`python -m training {dolly,schema}`: a thin parser over the run configuration."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.config import ATTENTIONS, LOSS_WEIGHTINGS, QUANTIZATIONS
from training.presets import PRESETS


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a LoRA adapter package for the hotswap service.",
    )
    p.add_argument("task", choices=["dolly", "schema"])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--config", type=Path, help="YAML file of sections data/model/lora/train")
    p.add_argument("--output-dir", type=Path, help="adapter package to write (default adapters/<task>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate the package in --output-dir")
    p.add_argument(
        "--publish",
        metavar="DEST",
        help="evaluate on the base as the service loads it, record it in the manifest, and upload the "
        "package to DEST: a directory, hf://org/repo[@revision], s3://bucket/prefix or gs://bucket/prefix",
    )
    p.add_argument(
        "--serve-quantization",
        default="nf4",
        choices=["nf4", "int8", "bf16", "fp32"],
        help="the base's quantization where the package will serve (--publish's evaluation; default nf4)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", dest="data.source", help="hub dataset id or local JSONL file")
    g.add_argument("--eval-size", dest="data.eval_size", type=int)
    g.add_argument("--max-train-records", dest="data.max_train_records", type=int)
    g = p.add_argument_group("model")
    g.add_argument("--base-model", dest="model.base")
    g.add_argument("--quantization", dest="model.quantization", choices=QUANTIZATIONS)
    g.add_argument("--device", dest="model.device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--attention", dest="model.attention", choices=ATTENTIONS)
    g.add_argument("--cache-dir", dest="model.cache_dir", type=Path)
    g = p.add_argument_group("lora")
    g.add_argument("--lora-r", dest="lora.r", type=int)
    g.add_argument("--lora-alpha", dest="lora.alpha", type=int)
    g.add_argument("--lora-dropout", dest="lora.dropout", type=float)
    g.add_argument("--lora-targets", dest="lora.targets", nargs="+")
    g.add_argument("--rslora", dest="lora.rslora", action="store_const", const=True, help="scale by alpha / sqrt(r)")
    g.add_argument(
        "--init-adapter",
        dest="lora.init",
        metavar="SOURCE",
        help="start from this package's LoRA weights (a directory, hf://, s3://, gs://; it must be for the "
        "same base) instead of fresh ones: a second epoch, or a published version tuned on new data",
    )
    g = p.add_argument_group("train")
    g.add_argument("--steps", dest="train.max_steps", type=int)
    g.add_argument("--batch-size", dest="train.batch_size", type=int)
    g.add_argument("--grad-accum", dest="train.grad_accum", type=int)
    g.add_argument("--learning-rate", "--lr", dest="train.learning_rate", type=float)
    g.add_argument("--max-length", dest="train.max_length", type=int)
    g.add_argument(
        "--loraplus-ratio",
        dest="train.loraplus_ratio",
        type=float,
        help="LoRA+: learning rate of the B matrices over that of A",
    )
    g.add_argument(
        "--loss-weighting",
        dest="train.loss_weighting",
        choices=LOSS_WEIGHTINGS,
        help="weigh every batch the same, or every labelled token of the run",
    )
    g.add_argument(
        "--neftune-alpha",
        dest="train.neftune_alpha",
        type=float,
        help="NEFTune: noise of this scale on the input embeddings while training (e.g. 5)",
    )
    g.add_argument(
        "--scheduler", dest="train.scheduler", help="transformers' LR schedule: cosine, linear, constant_with_warmup..."
    )
    g.add_argument("--warmup-steps", dest="train.warmup_steps", type=int)
    g.add_argument("--seed", dest="train.seed", type=int)
    g.add_argument("--save-steps", dest="train.save_steps", type=int)
    g.add_argument(
        "--eval-steps",
        dest="train.eval_steps",
        type=int,
        help="held-out loss during training every N steps (default: --save-steps)",
    )
    g.add_argument("--logging-steps", dest="train.logging_steps", type=int)
    g.add_argument("--tensorboard", dest="train.tensorboard", action="store_const", const=True)
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.adapters.sources import SourceError
    from training.config import build_config
    from training.data import DataError

    try:
        config = build_config(
            args.task,
            args.output_dir or Path("adapters") / args.task,
            preset_name=args.preset,
            config_file=args.config,
            overrides=overrides_from(args),
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from training.train import run

    try:
        metrics = run(
            config,
            resume=args.resume,
            eval_only=args.eval_only,
            publish=args.publish,
            serve_quantization=args.serve_quantization,
        )
    except (DataError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not metrics:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print_table(metrics)
    print(json.dumps({"adapter": str(config.output_dir), **metrics}))
    return 0


def print_table(metrics: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in metrics.items() if not isinstance(v, list)]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
