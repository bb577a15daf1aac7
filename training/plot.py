"""`python -m training.plot ADAPTER_DIR OUT.png`: training and eval loss from a run's own log."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def loss_curves(history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(h["step"], float(h["loss"])) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], float(h["eval_loss"])) for h in history if "eval_loss" in h]
    return train, evals


def running_mean(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Mean of each point and the `window - 1` before it (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(points):
        recent = points[max(0, i - window + 1) : i + 1]
        out.append((step, sum(v for _, v in recent) / len(recent)))
    return out


def plot(adapter_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((adapter_dir / "training_log.json").read_text())
    manifest = json.loads((adapter_dir / "hotswap.json").read_text())
    train, evals = loss_curves(history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    # A batch's training loss swings with its content (one-line answers against essays, and under
    # token weighting with its token count), so the trend is drawn as a running mean over the
    # last tenth of the run.
    window = max(1, len(train) // 10)
    ax.plot(
        *zip(*train, strict=True), label="training loss (logged)", alpha=0.3 if window > 1 else 1.0, color="tab:blue"
    )
    if window > 1:
        span = train[window][0] - train[0][0]  # window log points apart
        ax.plot(
            *zip(*running_mean(train, window), strict=True),
            color="tab:blue",
            label=f"training loss, mean of the last {span} steps",
        )
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label="held-out loss (adapter)")
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
