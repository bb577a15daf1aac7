"""The waiting line: requests taken from the queue and not admitted yet, with what the scheduler
needs to know of their adapters, and the admission half of a plan carried out on it.

The line sees adapters through `AdapterResidency` (which tier a version is in, the free and idle
slots) and turns them into the scheduler's plain values; the scheduler decides; the line then
starts the planned disk reads, asks each admitted request's adapter into a slot (one whose slot
is not free after all waits on), drops the cancelled, and reports slot waits (`on_slot_wait`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

from service.engine import scheduler as sched
from service.engine.config import EngineStats
from service.engine.jobs import Job, Outbox, Ready
from service.errors import HotswapError
from service.names import AdapterKey

if TYPE_CHECKING:
    from service.engine.residency import AdapterResidency

_TIERS = {"resident": sched.Tier.RESIDENT, "host": sched.Tier.HOST, "disk": sched.Tier.DISK}


class WaitingLine:
    def __init__(self, residency: AdapterResidency | None):
        self.jobs: deque[Job] = deque()  # FIFO
        self.draining: Hashable | None = None  # the adapter whose slot is freed for a waiting one
        self.last_tenant: str | None = None  # admitted last: round-robin across tenants starts after it
        self._residency = residency
        self._told: tuple[str, ...] = ()  # the labels waiting for a slot, as last told

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def append(self, job: Job) -> None:
        self.jobs.append(job)

    def clear(self) -> None:
        self.jobs.clear()
        self.draining = self.last_tenant = None

    def resolve(self, key: AdapterKey | None) -> AdapterKey | None:
        """The adapter version a key stands for (a bare name: its current one)."""
        return key if key is None or self._residency is None else self._residency.resolve(key)

    def snapshot(self, running: list[Job], busy: set[AdapterKey]) -> tuple[list[AdapterKey | None], dict[str, Any]]:
        """Each waiting job's adapter version, and the snapshot's fields about the line and the
        adapters: `running` are the running rows' jobs, `busy` the keys rows and prompts use."""
        keys = [self.resolve(job.key) for job in self.jobs]
        waiting = tuple(
            sched.Waiting(
                key, len(job.request.prompt_ids), self._tier(key), job.waiting_since is not None, tenant=job.tenant
            )
            if not job.cancelled.is_set()
            else sched.Waiting(key, 0, cancelled=True, tenant=job.tenant)
            for job, key in zip(self.jobs, keys, strict=True)
        )
        rows = tuple(self.resolve(job.key) for job in running)
        fields: dict[str, Any] = {"running": rows, "waiting": waiting, "draining": self.draining}
        fields["running_tenants"] = tuple(job.tenant for job in running)
        fields["last_tenant"] = self.last_tenant
        residency = self._residency
        if residency is not None:
            fields["free_slots"], fields["idle"] = residency.slots_view(busy)
            fields["pinned"] = frozenset(k for k in rows if k is not None and residency.is_pinned(k))
        return keys, fields

    def _tier(self, key: AdapterKey | None) -> sched.Tier:
        if key is None or self._residency is None:
            return sched.Tier.RESIDENT
        return _TIERS.get(self._residency.tier(key), sched.Tier.LOADING)

    def settle(
        self,
        plan: sched.StepPlan,
        keys: list[AdapterKey | None],
        admit: Callable[[Job], Ready],
        outbox: Outbox,
        stats: EngineStats,
    ) -> None:
        """Carry out the plan's admissions: `admit(job)` makes a job's adapter resident and takes
        it in (GO), or it waits on (WAIT), or it was answered (FAILED). Slot waits go to `stats`."""
        jobs, now = list(self.jobs), time.monotonic()
        self.draining, self.last_tenant = plan.draining, plan.last_tenant
        gone = set(plan.dropped) | self._fetch(jobs, keys, plan.reads, outbox)
        waits: list[float] = []
        for index in plan.admit:
            job = jobs[index]
            ready = admit(job)
            if ready is Ready.WAIT:
                job.waiting_since = job.waiting_since or now
                continue
            gone.add(index)
            if ready is Ready.GO and job.waiting_since is not None:
                waits.append(now - job.waiting_since)
        for index in plan.slot_wait:
            jobs[index].waiting_since = jobs[index].waiting_since or now
        self.jobs = deque(job for index, job in enumerate(jobs) if index not in gone)
        stats.slot_waits += waits
        waiters = tuple(job.label for job in self.jobs if job.waiting_since is not None)
        if waiters != self._told or waits:
            self._told = stats.slot_waiters = waiters

    def _fetch(
        self, jobs: list[Job], keys: list[AdapterKey | None], reads: frozenset[Hashable], outbox: Outbox
    ) -> set[int]:
        """Start the planned disk reads; the jobs of an adapter whose last read failed get its
        error. Returns the indices of those answered."""
        failed: set[int] = set()
        residency = self._residency
        if residency is None:
            return failed
        for key in reads:
            assert isinstance(key, AdapterKey)  # the plan's keys are the snapshot's
            try:
                residency.fetch(key)
            except HotswapError as exc:
                for index, job in enumerate(jobs):
                    if keys[index] == key:
                        outbox.post(job, exc)
                        failed.add(index)
        return failed
