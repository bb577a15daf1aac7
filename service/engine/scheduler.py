"""The batched engine's scheduler: what an iteration runs, decided from a snapshot of the state.

Two pure functions, called in turn by `BatchedEngine` (batched.py), which executes what they
decide and applies the outputs:

- `plan(snapshot) -> StepPlan`: the iteration's budget, which waiting requests join (FIFO
  within the batch's capacity and the budget, where a request whose adapter cannot run yet does
  not hold up the ones behind it), which adapter reads to start, and which adapter's slot to
  drain so that a waiting adapter is never starved.
- `pieces(joining, budget, ...) -> [PiecePlan]`: the piece of each joining prompt this step
  runs, and how: alone, batched with the other prompts that finish, or packed into the decode
  step. It runs after the admitted requests looked up their stored prefixes, which move where
  their prompts start.

Neither calls anything back: they read plain values and return plain values, so every rule is
a unit test without threads, a model or a clock (tests/service/engine/test_scheduler.py).

One progress counter per request: `computed`, the prompt tokens whose KV exists (a prefix hit,
the chunks so far). A piece is `[computed, computed + take)`; a request becomes a running row
when its last piece has run. One unit for the budget: work (budget.py), tokens with the
attention over their past counted, for admissions and pieces alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from service.engine.budget import StepBudget

Key = Hashable  # an adapter version (service.names.AdapterKey); None is the base
LOOKAHEAD = 4  # waiting requests passed over per iteration, per row of capacity, before it stops looking
RESERVE = 1  # rows a tenant over its fair share leaves free for the others (with tenants)


class Tier(Enum):
    """Where a waiting request's adapter is (AdapterResidency's tiers, as the plan needs them)."""

    RESIDENT = "resident"  # in a device slot (or the base): runs now
    HOST = "host"  # weights in host memory: runs once it has a slot
    DISK = "disk"  # must be read from disk first: waits, and the plan starts the read
    LOADING = "loading"  # being read from disk: waits


class How(Enum):
    """How a piece of a prompt runs."""

    ALONE = "alone"  # a prefill pass of its own (a chunk, one finishing prompt, prompt log-probs)
    BATCHED = "batched"  # one left-padded pass with the other prompts that finish this step
    PACKED = "packed"  # inside the decode step's forward pass (packed.py)


@dataclass(frozen=True)
class Waiting:
    """A request not admitted yet, as the plan sees it."""

    key: Key | None  # its adapter version (None: the base)
    size: int  # prompt tokens
    tier: Tier = Tier.RESIDENT
    waited: bool = False  # it has waited for an adapter slot already
    cancelled: bool = False
    tenant: str | None = None


@dataclass(frozen=True)
class Joining:
    """An admitted request whose prompt is not computed yet."""

    size: int  # prompt tokens
    computed: int = 0  # of them with KV (a stored prefix, chunks so far)
    logprobs: bool = False  # it wants its prompt's log-probabilities: one pass of its own, whole
    whole: bool = False  # the model cannot be prefilled in chunks: whole, in one pass
    tenant: str | None = None

    @property
    def left(self) -> int:
        return self.size - self.computed


@dataclass(frozen=True)
class Snapshot:
    capacity: int  # rows the batch holds
    running: tuple[Key | None, ...]  # each running row's adapter version
    joining: tuple[Joining, ...]
    waiting: tuple[Waiting, ...]  # FIFO
    budget: StepBudget  # measured step costs (read only)
    packs: bool = False  # pieces ride in the decode step (packed.py); False: passes of their own
    queued: int = 0  # requests still in the engine's queue, behind `waiting`
    free_slots: int = 1 << 30  # adapter slots empty or not made yet
    idle: frozenset[Key] = frozenset()  # resident adapters no row uses, not pinned: evictable
    pinned: frozenset[Key] = frozenset()  # of the running adapters, those never evicted
    draining: Key | None = None  # the adapter whose slot is being freed (the last plan's)
    # Tenants (TENANTS_FILE): each one's share, the running rows' tenants, and the tenant the
    # last plan admitted last (round-robin starts after it). No shares: no tenant rules.
    shares: Mapping[str, Share] = field(default_factory=dict)
    running_tenants: tuple[str | None, ...] = ()
    last_tenant: str | None = None


@dataclass(frozen=True)
class Share:
    """A tenant's part of the batch: its weight against the others', and its most rows."""

    weight: float = 1.0
    max_concurrent: int | None = None


@dataclass(frozen=True)
class StepPlan:
    budget: float  # work this iteration's pieces may do
    timed: bool  # the budget is the time budget's (a packed step beside running rows)
    packs: bool  # the pieces ride in the decode step (the snapshot's, decided once an iteration)
    admit: tuple[int, ...] = ()  # indices into `waiting`, in order
    dropped: tuple[int, ...] = ()  # cancelled while waiting
    slot_wait: tuple[int, ...] = ()  # waiting for their adapter (a slot or a disk read)
    reads: frozenset[Key] = frozenset()  # adapters whose disk read to start
    draining: Key | None = None
    last_tenant: str | None = None


@dataclass(frozen=True)
class PiecePlan:
    index: int  # into `joining`
    start: int  # == its computed tokens
    take: int
    how: How
    finishes: bool  # its last piece: the request starts generating after it


def step_budget(snapshot: Snapshot) -> tuple[float, bool]:
    """The work this iteration's prompts may do, and whether it is sized by time.

    Beside running rows in a packed step (PREFILL_STEP_SLOWDOWN set), what keeps the rows' step
    within the slowdown, one share per request waiting to join (as many as the batch has room
    for). Otherwise MAX_PREFILL_TOKENS' work: nobody waits for the step, or separate prefill
    passes, whose cost has a fixed part that packed steps share with the decode step."""
    budget, rows = snapshot.budget, len(snapshot.running)
    timed = rows > 0 and budget.slowdown > 0 and snapshot.packs
    if not timed:
        return budget.cap_work, False
    waiting = min(len(snapshot.joining) + len(snapshot.waiting) + snapshot.queued, snapshot.capacity - rows)
    return budget.allowance(rows, waiting), True


def plan(snapshot: Snapshot) -> StepPlan:
    """Who joins this iteration. The budget goes to prompts already joining first; then waiting
    requests are admitted in order while the batch has room and their prompts fit (the first one
    always fits: a long prompt is chunked). A request whose adapter cannot run yet (its weights
    are read from disk, or every slot serves running rows) waits without holding up the ones
    behind it, except those of its own adapter (FIFO per adapter). When one waits for a slot,
    one running adapter is drained: no new rows join it until the waiting one has its slot."""
    allowance, timed = step_budget(snapshot)
    costs = snapshot.budget
    spent = min(allowance, sum(costs.work(j.left, j.computed) for j in snapshot.joining))
    room = snapshot.capacity - len(snapshot.running) - len(snapshot.joining)
    slots = _Slots(snapshot.free_slots, set(snapshot.idle))
    shares = _Shares(snapshot)
    admit: list[int] = []
    dropped: list[int] = []
    waits: list[int] = []
    passed: list[int] = []  # looked at and left waiting, in order
    reads: set[Key] = set()
    blocked: set[Key | None] = set()
    draining = snapshot.draining
    for index in shares.order():
        job = snapshot.waiting[index]
        if len(admit) >= room or len(passed) >= LOOKAHEAD * snapshot.capacity:
            break
        if job.cancelled:
            dropped.append(index)
            continue
        cost = costs.work(job.size, 0)
        if (admit or spent) and spent + cost > allowance:
            break  # first in line for the next iteration
        if job.key in blocked or (job.key is not None and job.key == draining) or not shares.may(job, len(admit)):
            passed.append(index)
            continue
        if not slots.take(job):
            blocked.add(job.key)
            passed.append(index)
            waits.append(index)
            if job.tier is Tier.DISK:
                reads.add(job.key)
            elif job.tier is Tier.HOST and draining is None:
                draining = drain_choice(snapshot.running, snapshot.pinned)
            continue
        if job.waited and draining is not None and not _any_waits(snapshot, passed, waits):
            draining = None  # the waiting adapter got its slot
        admit.append(index)
        shares.took(job)
        spent += cost
    left = set(range(len(snapshot.waiting))) - set(admit) - set(dropped)
    if not _any_waits(snapshot, left, waits):
        draining = None
    last = shares.last or snapshot.last_tenant
    return StepPlan(
        allowance, timed, snapshot.packs, tuple(admit), tuple(dropped), tuple(waits), frozenset(reads), draining, last
    )


def drain_choice(running: Iterable[Key | None], pinned: frozenset[Key]) -> Key | None:
    """The running adapter to stop admitting to, so that its slot frees soonest: the one with the
    fewest running rows, never a pinned one (nor the base, which needs no slot)."""
    counts: dict[Key, int] = {}
    for key in running:
        if key is not None and key not in pinned:
            counts[key] = counts.get(key, 0) + 1
    return min(counts, key=counts.__getitem__) if counts else None


def pieces(
    joining: tuple[Joining, ...], budget: float, *, timed: bool, packs: bool, costs: StepBudget
) -> list[PiecePlan]:
    """This step's piece of each joining prompt, FIFO within the budget: a prompt whose rest fits
    gets all of it and starts generating after it, and one that cannot be chunked runs whole
    whatever is left. Sized by time, a last piece also leaves room for joining the running batch
    (StepBudget.piece). How each runs: a prompt that wants its log-probs (every position's
    logits) alone; else packed in the decode step where steps pack; else the prompts that
    finish share one batched pass, and a chunk, or a prompt that finishes alone, runs alone."""
    sized: list[tuple[int, int]] = []  # (index, take)
    for index, job in enumerate(joining):
        if job.whole or job.logprobs:
            take, spent = job.left, costs.work(job.left, job.computed)
        elif budget <= 0:
            continue
        elif timed:
            take, spent = costs.piece(budget, job.computed, job.left, job.size)
        else:
            take = min(job.left, costs.fit(budget, job.computed))
            spent = costs.work(take, job.computed)
        sized.append((index, take))
        budget -= spent
    finishing = [i for i, take in sized if take == joining[i].left and not joining[i].logprobs]
    result = []
    for index, take in sized:
        job = joining[index]
        finishes = take == job.left
        if job.logprobs:
            how = How.ALONE
        elif packs:
            how = How.PACKED
        elif finishes and len(finishing) >= 2:
            how = How.BATCHED
        else:
            how = How.ALONE
        result.append(PiecePlan(index, job.computed, take, how, finishes))
    return result


class _Shares:
    """Tenants' fair shares of the batch (with two or more tenants; none: every rule passes).

    Waiting requests are taken round-robin across tenants (FIFO within each), starting after the
    tenant the last plan admitted last, so a flood never stands between another tenant and the
    batch. A tenant never holds more than its `max_concurrent` rows. At its fair share (the
    capacity split by weight among the tenants with rows or requests) it waits while another
    tenant below its own has requests waiting. And past its guaranteed share (the capacity split
    among every tenant of the file) it takes a row only if RESERVE rows stay free, so a newcomer
    is admitted at the next step instead of waiting for a flood's rows to finish: alone, a
    tenant uses all but RESERVE rows."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.on = len(snapshot.shares) > 1
        self.held = Counter(snapshot.running_tenants) + Counter(j.tenant for j in snapshot.joining)
        self.rows = len(snapshot.running) + len(snapshot.joining)
        self.full: set[str | None] = set()
        self.last: str | None = None
        self.wanting: set[str | None] = set()
        self.fair: dict[str | None, float] = {}
        self.guaranteed: dict[str | None, float] = {}
        if not self.on:  # no tenant rules: nothing more to work out
            return
        wanting = {w.tenant for w in snapshot.waiting if not w.cancelled}
        active = {t for t, n in self.held.items() if n} | wanting
        self.wanting = {t for t in wanting if not self._capped(t)}  # those that could take a row
        total = sum(self._share(t).weight for t in active) or 1.0
        self.fair = {t: snapshot.capacity * self._share(t).weight / total for t in active}
        everyone = sum(s.weight for s in snapshot.shares.values()) or 1.0
        self.guaranteed = {t: snapshot.capacity * s.weight / everyone for t, s in snapshot.shares.items()}

    def _share(self, tenant: str | None) -> Share:
        return self.snapshot.shares.get(tenant, Share()) if tenant is not None else Share()

    def _capped(self, tenant: str | None) -> bool:
        most = self._share(tenant).max_concurrent
        return most is not None and self.held[tenant] >= most

    def order(self) -> list[int]:
        """The waiting requests' indices, round-robin across tenants from the one after the last."""
        waiting = self.snapshot.waiting
        if not self.on:
            return list(range(len(waiting)))
        queues: dict[str | None, list[int]] = {}
        for index, job in enumerate(waiting):
            queues.setdefault(job.tenant, []).append(index)
        ring = sorted(queues, key=lambda t: (t is None, t or ""))
        after = [t for t in ring if self.snapshot.last_tenant is not None and (t or "") > self.snapshot.last_tenant]
        ring = after + [t for t in ring if t not in after]
        order: list[int] = []
        for turn in range(max(len(q) for q in queues.values()) if queues else 0):
            order += [queues[t][turn] for t in ring if turn < len(queues[t])]
        return order

    def may(self, job: Waiting, admitted: int) -> bool:
        """Whether the job's tenant may take a row now (`admitted`: rows this plan gave)."""
        if not self.on:
            return True
        tenant = job.tenant
        if tenant in self.full:
            return False
        held = self.held[tenant]
        free_after = self.snapshot.capacity - self.rows - admitted - 1
        capped = self._capped(tenant)
        yields = held >= self.fair.get(tenant, 0.0) and any(
            t != tenant and t not in self.full and self.held[t] < self.fair[t] for t in self.wanting
        )
        crowds = held >= self.guaranteed.get(tenant, 0.0) and free_after < RESERVE
        if capped or yields or crowds:
            self.full.add(tenant)  # its later requests wait too (FIFO per tenant)
            return False
        return True

    def took(self, job: Waiting) -> None:
        self.held[job.tenant] += 1
        self.last = job.tenant


class _Slots:
    """The adapter slots as the plan gives them out: empty ones first, then idle ones."""

    def __init__(self, free: int, idle: set[Key]):
        self.free, self.idle = free, idle
        self.given: set[Key | None] = set()

    def take(self, job: Waiting) -> bool:
        """Whether the job's adapter can run this iteration (giving it a slot if it needs one)."""
        if job.key is None or job.key in self.given or job.tier is Tier.RESIDENT:
            self.idle.discard(job.key)  # in use now: not to be evicted
            self.given.add(job.key)
            return True
        if job.tier is not Tier.HOST:
            return False
        if self.free > 0:
            self.free -= 1
        elif self.idle:
            self.idle.pop()  # the residency evicts the least recently used of them
        else:
            return False
        self.given.add(job.key)
        return True


def _any_waits(snapshot: Snapshot, indices: Iterable[int], waits: list[int]) -> bool:
    """Whether any of these waiting requests waits for an adapter slot (now or before)."""
    return any(snapshot.waiting[i].waited or i in waits for i in indices)
