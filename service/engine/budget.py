"""How many prompt tokens a packed step may carry while streams run (issue #22, item 2).

A fixed `MAX_PREFILL_TOKENS` does not port across machines: 32 tokens keep a 2-core CPU's
running streams within 2x of a plain decode step, and starve a GPU, where a decode step costs
what hundreds of prompt tokens cost. `StepBudget` sizes each packed step by time instead: the
prompt tokens a step carries beside its running rows are as many as fit in `slowdown - 1` plain
decode steps, with both costs measured as the engine runs.

Its cost model is that of a packed step (service/engine/packed.py): the rows' decode tokens and
the prompt pieces go through the model as one sequence, so a step of r rows lasts about
D(r) + c * W, where D(r) is a plain decode step of r rows, W the pieces' work and c the seconds
per unit of work. A piece of n tokens at position `start` does n tokens of linear layers and
n * (start + n / 2) query-key pairs of attention; measured in tokens of linear-layer work, that
is n + n * (start + n / 2) / span, where `span` is the context length at which a token's
attention costs what its linear layers cost, from the model's shapes (`attention_span`: about
3,000 for SmolLM2). The last chunks of a 1,000-token prompt cost a third more per token than
its first, which a per-token average would keep underestimating. D is a running average per
row count, c the ratio of the running averages of the extra time and of the work over recent
packed steps (so a step that carried 3 tokens cannot swing it). The allowance grows at most to
twice the most work a measured step carried, so early, small steps are not extrapolated far.

The bound is per joining request: with n requests waiting to join (as many as the batch has
room for), a step may carry n times the work. A bound per step made a backlog queue behind the
running streams, and a burst's last request join long after its first (docs/benchmarks.md,
"Figures behind the engine's design"). The running streams' ITL stays bounded while prompts
join one at a time, the case of issue #22's target; a backlog costs them a longer stall, as
with no limit.

A step that finishes a prompt also joins it to the running batch: its KV goes into the running
cache, which every later step then carries. That cost grows with the prompt's length and comes
on top of its tokens', so it is learned apart, per joined prompt token, from the steps that
finish prompts, and the last piece of a prompt leaves room for it (`piece`).
"""

from __future__ import annotations

import math
from typing import Any


def attention_span(model: Any) -> float | None:
    """The context length at which one token's attention (4 FLOPs per query-key pair, per layer,
    head and head dimension) costs what its linear layers cost (2 FLOPs per weight); None when
    the model's shapes are not those of a decoder transformers describes."""
    import torch

    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if config is None:
        return None
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError:
        return None
    output = getattr(model, "get_output_embeddings", lambda: None)()
    weights = sum(  # the base's linear layers: not the LM head (it runs on last tokens only), not LoRA's
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output and "lora_" not in name
    )
    if not weights:
        return None
    return weights / (2 * layers * heads * head_dim)


class StepBudget:
    def __init__(
        self,
        slowdown: float,
        cap: int,
        *,
        span: float | None = None,
        least: int = 16,
        first: int = 32,
        weight: float = 0.2,
    ):
        """`slowdown`: the longest a step carrying prompt tokens may last, in plain decode steps
        (0: no time limit, `cap` always); `cap`: the most tokens a step carries (MAX_PREFILL_TOKENS);
        `span`: attention_span (None: attention is not counted); `least`: the least work a step
        may carry, so that a joining prompt always moves; `first`: before any packed step is
        measured; `weight`: of the newest sample in the running averages."""
        self.slowdown = slowdown
        self.cap = cap
        self.span = span
        self.least = min(least, cap)
        self.first = min(first, cap)
        self.weight = weight
        self._decode: dict[int, float] = {}  # rows -> seconds of a plain decode step
        self._extra = 0.0  # running average of (packed step - plain step) seconds
        self._work = 0.0  # running average of the work those steps carried
        self._join: float | None = None  # seconds of joining a prompt, per token of it
        self._largest = 0.0  # the most work a measured packed step carried

    def allowance(self, rows: int, waiting: int = 0) -> float:
        """Work a step may carry beside `rows` running rows while `waiting` requests wait to
        join (the ones being prefilled included): `cap` when nothing runs (nobody waits for the
        step) or when no time limit is set. The slowdown is what the running streams give up
        for each request that joins, so with several waiting the step may carry that many times
        more: a backlog drains at the pace it would with no limit."""
        if rows == 0 or self.slowdown <= 0:
            return self.cap_work
        decode = self._decode_seconds(rows)
        if decode is None or self._work == 0.0:
            fit = float(self.first)
        else:
            fit = (self.slowdown - 1.0) * decode / self._per_work()
            # Never far past what was measured: the first steps' costs are noisy and small.
            fit = min(fit, max(float(self.first), 2 * self._largest))
        fit *= max(1, waiting)
        return max(float(self.least), min(self.cap_work, fit))

    @property
    def cap_work(self) -> float:
        """MAX_PREFILL_TOKENS as work: that of a prompt of `cap` tokens from its start. Admissions
        and pieces spend work whether or not the budget is sized by time (one unit)."""
        return self.work(self.cap, 0)

    def work(self, tokens: int, start: int) -> float:
        """A piece of `tokens` prompt tokens at position `start`, in tokens of linear-layer work."""
        if self.span is None:
            return float(tokens)
        return tokens + tokens * (start + tokens / 2) / self.span

    def fit(self, allowance: float, start: int) -> int:
        """The most tokens a piece at position `start` may carry within `allowance` (at least 1)."""
        if self.span is None:
            return max(1, int(allowance + 1e-9))
        a, b = 1 / (2 * self.span), 1 + start / self.span  # a n^2 + b n = allowance
        return max(1, int((-b + math.sqrt(b * b + 4 * a * allowance)) / (2 * a) + 1e-9))

    def piece(self, allowance: float, start: int, left: int, length: int) -> tuple[int, float]:
        """Tokens of a prompt's next piece (at `start`, `left` of `length` still to prefill) within
        `allowance`, and the work that spends. A piece that finishes the prompt also joins it:
        if that would not fit beside its tokens, it stops short, and the next step carries the
        few tokens left with the join."""
        take = min(left, self.fit(allowance, start))
        if take < left:
            return take, self.work(take, start)
        join = self.join_work(length)
        spent = self.work(left, start) + join
        if spent <= allowance or left == 1:
            return left, spent
        rest = self.fit(allowance - join, length - 1) if allowance > join else 1
        take = max(1, left - rest)
        return take, self.work(take, start)

    def join_work(self, length: int) -> float:
        """What joining a prompt of `length` tokens to the running batch costs, in work (0 until
        measured)."""
        if self._join is None or self._work == 0.0:
            return 0.0
        return self._join * length / self._per_work()

    def observe(self, rows: int, seconds: float, work: float = 0.0, joined: int = 0) -> None:
        """One step's wall time: a plain decode step of `rows` rows (`work` 0), or a packed one
        that also carried pieces of `work` (StepBudget.work) and finished prompts of `joined`
        tokens in all."""
        if rows == 0:
            return  # a step of prompts alone: no running rows to compare it with
        if work == 0:
            old = self._decode.get(rows)
            self._decode[rows] = seconds if old is None else old + self.weight * (seconds - old)
            return
        decode = self._decode_seconds(rows)
        if decode is None:
            return
        extra = max(seconds - decode, 0.0)
        self._largest = max(self._largest, work)
        if joined:
            if self._work:
                sample = max(extra - self._per_work() * work, 0.0) / joined
                self._join = sample if self._join is None else self._join + self.weight * (sample - self._join)
            return
        if self._work == 0.0:
            self._extra, self._work = extra, work
        else:
            self._extra += self.weight * (extra - self._extra)
            self._work += self.weight * (work - self._work)

    def _per_work(self) -> float:
        return max(self._extra, 1e-9) / self._work

    def _decode_seconds(self, rows: int) -> float | None:
        """A plain step of `rows` rows: measured at that count, else at the nearest one measured."""
        if rows in self._decode:
            return self._decode[rows]
        if not self._decode:
            return None
        return self._decode[min(self._decode, key=lambda known: abs(known - rows))]
