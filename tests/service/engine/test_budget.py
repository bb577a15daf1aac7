"""The packed step's prompt budget, sized by time (service/engine/budget.py)."""

from __future__ import annotations

import pytest

from service.engine.budget import StepBudget, attention_span


def measured(slowdown=2.0, cap=4096, decode=0.1, rows=4, packed=((50, 0.2),), span=None) -> StepBudget:
    """A budget that saw a plain step of `rows` rows take `decode` s, then packed steps of
    (tokens at position 0, seconds)."""
    budget = StepBudget(slowdown, cap, span=span)
    budget.observe(rows, decode)
    for tokens, seconds in packed:
        budget.observe(rows, seconds, budget.work(tokens, 0))
    return budget


def test_nothing_running_or_no_limit_gives_the_cap():
    assert measured().allowance(0) == 4096  # a step of prompts alone: nobody waits for it
    assert measured(slowdown=0).allowance(4) == 4096


def test_the_allowance_fills_the_allowed_slowdown():
    # 50 tokens cost 0.1 s beside a 0.1 s decode step: 2 ms a token.
    assert measured(slowdown=2.0).allowance(4) == pytest.approx(50)  # one more decode step's time
    assert measured(slowdown=1.5).allowance(4) == pytest.approx(25)
    assert measured(slowdown=3.0).allowance(4) == pytest.approx(100)
    assert measured(slowdown=3.0, cap=64).allowance(4) == 64  # MAX_PREFILL_TOKENS stays the cap


def test_before_a_packed_step_is_measured_a_small_first_allowance():
    assert StepBudget(2.0, 4096).allowance(4) == 32
    budget = StepBudget(2.0, 4096)
    budget.observe(4, 0.2, 50)  # no plain step to compare with yet: not a sample
    assert budget.allowance(4) == 32


def test_a_joining_prompt_always_moves():
    # A step barely faster than the cost of its prompt tokens: the fit is 0, the least is kept.
    assert measured(slowdown=1.01, packed=[(50, 0.5)]).allowance(4) == 16
    assert StepBudget(2.0, 4096, span=100).fit(0.5, 5000) == 1


def test_the_nearest_measured_row_count_stands_in():
    budget = measured(decode=0.1, rows=4)
    budget.observe(16, 0.2)
    assert budget.allowance(12) == budget.allowance(16) == pytest.approx(100)  # 0.2 s: 100 tokens
    assert budget.allowance(5) == pytest.approx(50)


def test_the_costs_follow_the_machine():
    """Slower packed steps lower the allowance; the costs are averaged over steps weighted by
    their work, so a step that carried 3 tokens and lasted 30 ms long (10 ms a token, where an
    average of per-step rates would take a fifth of that) barely moves it."""
    steady = measured(packed=[(50, 0.2)] * 5)
    slower = measured(packed=[(50, 0.2)] * 5 + [(50, 0.3)] * 10)
    noisy = measured(packed=[(50, 0.2)] * 5 + [(3, 0.13)])
    assert slower.allowance(4) == pytest.approx(25, abs=2)  # 4 ms a token after it settles
    assert steady.allowance(4) == pytest.approx(50)
    assert 45 <= noisy.allowance(4) < 50


def test_later_chunks_of_a_long_prompt_carry_fewer_tokens():
    """With attention counted (span 1,000: a token's attention over 1,000 keys costs what its
    linear layers cost), a chunk deep into a prompt fits fewer tokens in the same time."""
    budget = measured(span=1000)  # 50 tokens at 0: 51.25 work in 0.1 s
    allowance = budget.allowance(4)
    assert allowance == pytest.approx(51.25)
    assert budget.fit(allowance, 0) == 50
    assert budget.fit(allowance, 1000) == 25  # twice the cost a token: half the tokens
    assert budget.work(25, 1000) == pytest.approx(50.3125) and budget.work(26, 1000) > allowance
    assert StepBudget(2.0, 4096).fit(allowance, 1000) == 51  # without a span: tokens alone


def test_joining_a_prompt_is_learned_apart_and_its_last_piece_leaves_room():
    """A step that finished a 1,000-token prompt lasted 0.1 s more than its 10 tokens explain:
    joining costs 0.1 ms per prompt token, 50 tokens' worth at 2 ms a token; the token cost is
    unchanged by it. A last piece that cannot carry the join beside its tokens stops short."""
    budget = measured()
    assert budget.join_work(1000) == 0  # not measured yet
    budget.observe(4, 0.1 + 0.02 + 0.1, 10, joined=1000)
    assert budget.join_work(1000) == pytest.approx(50)
    assert budget.join_work(100) == pytest.approx(5)
    assert budget.allowance(4) == pytest.approx(50)
    assert budget.piece(50, 0, 40, 100) == (40, pytest.approx(45))  # 40 tokens and the join fit
    assert budget.piece(50, 900, 60, 960) == (50, pytest.approx(50))  # not the last piece
    assert budget.piece(50, 900, 40, 940) == (37, pytest.approx(37))  # 3 left: 3 + 47 <= 50
    assert budget.piece(80, 900, 40, 940) == (7, pytest.approx(7))  # 33 left: 33 + 47 <= 80
    assert budget.piece(40, 900, 40, 940) == (39, pytest.approx(39))  # the join alone is more: 1


def test_the_span_of_a_real_shape(tiny, tokenizer):
    """Llama-shaped tiny model: its linear layers' weights over 2 x layers x heads x head_dim."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.base_dir)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    expected = c.num_hidden_layers * per_layer / (2 * c.num_hidden_layers * c.num_attention_heads * head_dim)
    assert attention_span(model) == pytest.approx(expected)


def test_the_allowance_grows_no_faster_than_twice_what_was_measured():
    """Steps of 8 tokens that looked cheap (noise at that size) would give 800 tokens at once;
    the allowance doubles from what was measured instead."""
    budget = measured(packed=[(8, 0.101)])
    assert budget.allowance(4) == 32  # the first allowance, as nothing above 16 was measured
    budget.observe(4, 0.102, 32)
    assert budget.allowance(4) == 64
    budget.observe(4, 0.104, 64)
    assert budget.allowance(4) == 128


def test_each_joining_request_widens_the_step():
    """One waiting (or none): the bound as it is; 8 waiting: 8 times the allowance (within the
    cap), so a backlog does not queue behind the running rows."""
    budget = measured(rows=2)
    assert budget.allowance(2, waiting=0) == budget.allowance(2, waiting=1) == pytest.approx(50)
    assert budget.allowance(2, waiting=8) == pytest.approx(400)
    assert measured(rows=2, cap=128).allowance(2, waiting=8) == 128
    assert StepBudget(2.0, 4096).allowance(1, waiting=7) == 7 * 32  # before anything was measured
