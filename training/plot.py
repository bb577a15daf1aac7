"""`python -m training.plot ADAPTER_DIR OUT.png`: training and eval loss from a run's own log."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def loss_curves(history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(h["step"], float(h["loss"])) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    return train, evals


def plot(adapter_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((adapter_dir / "training_log.json").read_text())
    manifest = json.loads((adapter_dir / "hotswap.json").read_text())
    train, evals = loss_curves(history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), label="training loss (batch)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss (adapter)")
    base = manifest.get("metrics", {}).get("eval_loss_base")
    if base:
        ax.axhline(base, color="grey", linestyle="--", label=f"base model, same template ({base:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("per-token loss (response + EOS)")
    ax.set_title(f"adapter {manifest['name']}: {manifest.get('training', {}).get('recipe', '')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m training.plot ADAPTER_DIR OUT.png")
    print(plot(Path(sys.argv[1]), Path(sys.argv[2])))
