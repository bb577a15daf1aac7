"""The scheduler's rules (service/engine/scheduler.py) on plain snapshots: no model, no threads,
no clock. Each test names the rule it holds; breaking the rule fails it."""

from __future__ import annotations

import pytest

from service.engine.budget import StepBudget
from service.engine.scheduler import (
    LOOKAHEAD,
    RESERVE,
    How,
    Joining,
    Share,
    Snapshot,
    Tier,
    Waiting,
    drain_choice,
    pieces,
    plan,
)


def budget(cap=100, slowdown=0.0, span=None, allowance=None) -> StepBudget:
    costs = StepBudget(slowdown, cap, span=span)
    if allowance is not None:
        costs.allowance = lambda rows, waiting: allowance
    return costs


def snap(waiting=(), running=(), joining=(), capacity=4, costs=None, **more) -> Snapshot:
    return Snapshot(capacity, tuple(running), tuple(joining), tuple(waiting), costs or budget(), **more)


def job(size=10, key=None, **more) -> Waiting:
    return Waiting(key, size, **more)


# --- admission: FIFO, capacity, budget -----------------------------------------------------------


def test_admits_in_order_up_to_the_batchs_room():
    step = plan(snap([job(), job(), job(), job(), job()], running=["a"], joining=[Joining(10)], capacity=4))
    assert step.admit == (0, 1)  # 4 rows: one running, one joining, two join


def test_admits_within_the_budget_and_the_next_waits_in_line():
    step = plan(snap([job(40), job(40), job(40), job(5)], costs=budget(cap=100)))
    assert step.admit == (0, 1)  # 80 of 100; the third does not fit, and nobody passes it
    assert step.budget == 100 and not step.timed


def test_the_first_prompt_is_admitted_whatever_its_size():
    assert plan(snap([job(5000), job(1)], costs=budget(cap=100))).admit == (0,)  # it is chunked


def test_prompts_already_joining_have_the_budget_first():
    joining = [Joining(200, computed=150)]  # 50 left
    assert plan(snap([job(40), job(40)], joining=joining, costs=budget(cap=100))).admit == (0,)
    full = [Joining(500)]
    assert plan(snap([job(1)], joining=full, costs=budget(cap=100))).admit == ()  # nothing new this step


def test_admission_spends_work_the_unit_pieces_spend():
    """With attention counted (span), a long prompt costs more than its tokens."""
    costs = budget(cap=100, span=100)
    assert costs.cap_work == pytest.approx(150)  # 100 tokens + 100 * 50 / 100
    assert plan(snap([job(60), job(50)], costs=costs)).admit == (0, 1)  # 110 tokens, but 78 + 62.5 <= 150
    assert plan(snap([job(80), job(40)], costs=costs)).admit == (0,)  # 112 + 48 > 150


def test_cancelled_requests_are_dropped_not_admitted():
    step = plan(snap([job(), job(cancelled=True), job()]))
    assert step.dropped == (1,) and step.admit == (0, 2)


def test_the_time_budget_applies_only_beside_running_rows_in_packed_steps():
    costs = budget(cap=100, slowdown=2.0, allowance=8)
    assert plan(snap([job(9)], running=["a"], costs=costs, packs=True)).budget == 8
    assert plan(snap([job(9)], running=["a"], costs=costs, packs=True)).timed
    assert plan(snap([job(9)], running=[], costs=costs, packs=True)).budget == 100  # nobody waits for it
    assert plan(snap([job(9)], running=["a"], costs=costs, packs=False)).budget == 100  # passes of their own


def test_each_request_waiting_to_join_widens_the_time_budget():
    asked = []
    costs = budget(slowdown=2.0)
    costs.allowance = lambda rows, waiting: asked.append((rows, waiting)) or 8
    plan(snap([job(), job(), job()], running=["a"], joining=[Joining(10)], costs=costs, packs=True, queued=1))
    plan(snap([job(), job(), job()], running=["a"], joining=[Joining(10)], costs=costs, packs=True, capacity=8))
    plan(
        snap([job(), job(), job()], running=["a"], joining=[Joining(10)], costs=costs, packs=True, capacity=8, queued=2)
    )
    assert asked == [(1, 3), (1, 4), (1, 6)]  # joining + waiting + queued, within the batch's room


# --- adapters: waiting without holding others up, FIFO per adapter --------------------------------


def test_a_request_whose_adapter_is_read_waits_and_the_others_go_on():
    waiting = [job(key="a", tier=Tier.LOADING), job(key="b"), job(key="a", tier=Tier.LOADING), job()]
    step = plan(snap(waiting))
    assert step.admit == (1, 3) and step.slot_wait == (0,)  # a's second stays behind its first


def test_a_read_starts_for_an_adapter_on_disk():
    step = plan(snap([job(key="a", tier=Tier.DISK), job(key="a", tier=Tier.DISK)]))
    assert step.reads == {"a"} and step.admit == () and step.slot_wait == (0,)


def test_an_adapter_in_host_memory_takes_a_free_slot_then_an_idle_one():
    waiting = [job(key="a", tier=Tier.HOST), job(key="b", tier=Tier.HOST), job(key="c", tier=Tier.HOST)]
    step = plan(snap(waiting, free_slots=1, idle=frozenset({"z"})))
    assert step.admit == (0, 1) and step.slot_wait == (2,)


def test_a_resident_adapter_in_use_is_not_counted_idle():
    """x is idle, but a request for x is admitted first: its slot is not free for y."""
    waiting = [job(key="x"), job(key="y", tier=Tier.HOST)]
    step = plan(snap(waiting, free_slots=0, idle=frozenset({"x"})))
    assert step.admit == (0,) and step.slot_wait == (1,)


def test_two_requests_for_one_new_adapter_take_one_slot():
    waiting = [job(key="a", tier=Tier.HOST), job(key="a", tier=Tier.HOST), job(key="b", tier=Tier.HOST)]
    step = plan(snap(waiting, free_slots=1))
    assert step.admit == (0, 1) and step.slot_wait == (2,)


# --- fairness: draining a slot for a waiting adapter ----------------------------------------------


def test_a_request_waiting_for_a_slot_drains_the_adapter_with_fewest_rows():
    running = ["a", "a", "b", None, None]
    step = plan(
        snap([job(key="c", tier=Tier.HOST), job(key="b"), job(key="a")], running=running, capacity=8, free_slots=0)
    )
    assert step.draining == "b"
    assert step.admit == (2,)  # no new rows for b; a goes on


def test_a_pinned_adapter_is_never_drained_nor_the_base():
    assert drain_choice(["a", "b", "b", None], frozenset({"a"})) == "b"
    assert drain_choice([None, None], frozenset()) is None
    step = plan(snap([job(key="c", tier=Tier.HOST)], running=["a"], free_slots=0, pinned=frozenset({"a"})))
    assert step.draining is None


def test_a_read_from_disk_does_not_drain():
    step = plan(snap([job(key="c", tier=Tier.LOADING)], running=["a"], free_slots=0))
    assert step.draining is None


def test_draining_ends_once_the_waiting_adapter_has_its_slot():
    waited = job(key="c", tier=Tier.HOST, waited=True)
    step = plan(snap([waited, job(key="b")], running=["a"], free_slots=1, draining="b"))
    assert step.admit == (0, 1) and step.draining is None  # b's requests flow again at once
    assert plan(snap([job(key="b")], running=["b"], draining="b")).draining is None  # nobody waits any more


def test_draining_holds_while_the_adapter_still_waits():
    waiting = [job(key="c", tier=Tier.HOST, waited=True), job(key="b")]
    step = plan(snap(waiting, running=["b"], free_slots=0, draining="b"))
    assert step.draining == "b" and step.admit == () and step.slot_wait == (0,)


def test_looking_past_waiting_requests_is_bounded():
    waiting = [job(key="a", tier=Tier.LOADING)] * (LOOKAHEAD * 2 + 3) + [job()]
    step = plan(snap(waiting, capacity=2))
    assert step.admit == ()  # the base request is too far behind this step
    assert step.slot_wait == (0,)  # the first of a's waits; the rest are behind it


# --- pieces ---------------------------------------------------------------------------------------


def test_a_prompt_that_fits_runs_whole_and_one_that_does_not_is_chunked():
    step = pieces((Joining(30), Joining(200)), 100, timed=False, packs=False, costs=budget(cap=100))
    assert [(p.start, p.take, p.finishes) for p in step] == [(0, 30, True), (0, 70, False)]


def test_pieces_start_at_the_computed_tokens():
    step = pieces((Joining(50, computed=20),), 100, timed=False, packs=True, costs=budget())
    assert [(p.start, p.take, p.how) for p in step] == [(20, 30, How.PACKED)]


def test_a_spent_budget_leaves_later_prompts_for_the_next_step():
    step = pieces((Joining(200), Joining(10)), 100, timed=False, packs=True, costs=budget())
    assert [(p.index, p.take) for p in step] == [(0, 100)]


def test_prompts_that_cannot_be_chunked_or_want_log_probs_run_whole():
    joining = (Joining(500, whole=True), Joining(300, logprobs=True), Joining(10))
    step = pieces(joining, 100, timed=False, packs=False, costs=budget())
    assert [(p.index, p.take, p.how) for p in step] == [(0, 500, How.ALONE), (1, 300, How.ALONE)]
    together = pieces(
        (Joining(500, whole=True), Joining(10, whole=True)), 100, timed=False, packs=False, costs=budget()
    )
    assert [(p.take, p.how) for p in together] == [(500, How.BATCHED), (10, How.BATCHED)]


def test_how_pieces_run():
    joining = (Joining(10), Joining(10), Joining(500), Joining(10, logprobs=True))
    separate = pieces(joining, 300, timed=False, packs=False, costs=budget())
    assert [p.how for p in separate] == [How.BATCHED, How.BATCHED, How.ALONE, How.ALONE]
    packed = pieces(joining, 300, timed=False, packs=True, costs=budget())
    assert [p.how for p in packed] == [How.PACKED, How.PACKED, How.PACKED, How.ALONE]
    alone = pieces((Joining(10), Joining(500)), 300, timed=False, packs=False, costs=budget())
    assert [p.how for p in alone] == [How.ALONE, How.ALONE]  # one finishing prompt: no batch of one


def test_pieces_spend_work_with_attention_counted():
    costs = budget(span=100)
    step = pieces((Joining(400, computed=100), Joining(50)), 100, timed=False, packs=True, costs=costs)
    assert step[0].take == costs.fit(100, 100) < 100  # later tokens cost more
    assert step[1].take == costs.fit(100 - costs.work(step[0].take, 100), 0)  # what their work left


def test_a_timed_last_piece_leaves_room_for_its_join():
    costs = budget(span=None)
    costs.join_work = lambda length: 6
    step = pieces((Joining(10, computed=2),), 8, timed=True, packs=True, costs=costs)
    assert step[0].take == 6 and not step[0].finishes  # 8 left + the join does not fit in 8
    untimed = pieces((Joining(10, computed=2),), 8, timed=False, packs=True, costs=costs)
    assert untimed[0].take == 8 and untimed[0].finishes  # MAX_PREFILL_TOKENS counts tokens' work only


# --- tenants: round-robin, fair shares, max_concurrent (TENANTS_FILE) -----------------------------

TWO = {"a": Share(), "b": Share()}


def of(tenant, count, size=10):
    return [job(size, tenant=tenant) for _ in range(count)]


def test_without_tenants_the_order_is_fifo():
    waiting = of("a", 3) + of("b", 1)
    assert plan(snap(waiting, capacity=8)).admit == (0, 1, 2, 3)


def test_tenants_are_taken_round_robin_from_the_one_after_the_last():
    waiting = of("a", 4) + of("b", 2)
    step = plan(snap(waiting, capacity=6, shares=TWO, costs=budget(cap=1000)))
    assert step.admit == (0, 4, 1, 5, 2)  # a, b, a, b, a: a past its 3 leaves the reserve of 1
    assert step.last_tenant == "a"
    after_a = plan(snap(waiting, capacity=3, shares=TWO, last_tenant="a", costs=budget(cap=1000)))
    assert after_a.admit[0] == 4  # b first: a had the last turn


def test_a_flood_leaves_a_row_for_another_tenant():
    """a alone fills all but RESERVE rows; b then gets the free one at once."""
    flood = plan(snap(of("a", 20), capacity=8, shares=TWO, costs=budget(cap=1000)))
    assert len(flood.admit) == 8 - RESERVE
    step = plan(snap(of("a", 5) + of("b", 1), running=["x"] * 7, running_tenants=["a"] * 7, capacity=8, shares=TWO))
    assert step.admit == (5,)  # b's, past a's five


def test_a_tenant_below_its_share_may_take_the_reserve():
    running = ["x"] * 6
    tenants = ["a"] * 5 + ["b"]
    step = plan(snap(of("b", 2), running=running, running_tenants=tenants, capacity=8, shares=TWO))
    assert step.admit == (0, 1)  # b holds 1 of its 4: it may fill the batch


def test_a_tenant_over_its_share_waits_while_others_get_rows():
    running, tenants = ["x"] * 4, ["a"] * 4
    step = plan(snap(of("a", 3) + of("b", 3), running=running, running_tenants=tenants, capacity=8, shares=TWO))
    assert sorted(step.admit) == [3, 4, 5]  # a is at its share (4 of 8) with b active; b takes 3
    assert plan(snap(of("a", 3), running=running, running_tenants=tenants, capacity=8, shares=TWO)).admit == (0, 1, 2)


def test_weights_split_the_fair_share():
    shares = {"a": Share(weight=3), "b": Share(weight=1)}
    running, tenants = ["x"] * 6, ["a"] * 6
    step = plan(snap(of("a", 2) + of("b", 2), running=running, running_tenants=tenants, capacity=8, shares=shares))
    assert sorted(step.admit) == [2, 3]  # a's share is 6 of 8: b takes the last two


def test_max_concurrent_caps_a_tenant_alone_too():
    shares = {"a": Share(max_concurrent=2), "b": Share()}
    step = plan(snap(of("a", 4), running=["x"], running_tenants=["a"], capacity=8, shares=shares))
    assert step.admit == (0,)  # 1 running + 1 = its 2


def test_a_capped_tenant_does_not_make_the_others_yield():
    """b waits at its max_concurrent: a, at its fair share, need not leave rows b cannot take."""
    shares = {"a": Share(), "b": Share(max_concurrent=1)}
    running, tenants = ["x"] * 5, ["a"] * 4 + ["b"]
    step = plan(snap(of("a", 2) + of("b", 2), running=running, running_tenants=tenants, capacity=8, shares=shares))
    assert step.admit == (0, 1)
