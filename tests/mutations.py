"""Mutation check of the scheduler's unit tests (issue #32): each mutation breaks one rule of
service/engine/scheduler.py, and tests/service/engine/test_scheduler.py must fail for every one.
Run `.venv/bin/python -m tests.mutations` from the checkout; it restores the file when done."""

import pathlib
import subprocess

SCHEDULER = pathlib.Path("service/engine/scheduler.py")
MUTATIONS = [
    ("if len(admit) >= room or", "if len(admit) > room or"),  # capacity
    ("if (admit or spent) and spent + cost > allowance:", "if spent + cost > allowance:"),  # first always admitted
    (
        "if (admit or spent) and spent + cost > allowance:\n            break",
        "if (admit or spent) and spent + cost > allowance:\n            continue",
    ),  # FIFO: nobody passes
    (
        "spent = min(allowance, sum(costs.work(j.left, j.computed) for j in snapshot.joining))",
        "spent = 0",
    ),  # joining first
    ("cost = costs.work(job.size, 0)", "cost = job.size"),  # one unit
    ("            dropped.append(index)\n            continue", "            pass"),  # cancelled dropped
    ("timed = rows > 0 and budget.slowdown > 0 and snapshot.packs", "timed = budget.slowdown > 0 and snapshot.packs"),
    ("timed = rows > 0 and budget.slowdown > 0 and snapshot.packs", "timed = rows > 0 and budget.slowdown > 0"),
    (
        "len(snapshot.joining) + len(snapshot.waiting) + snapshot.queued",
        "len(snapshot.joining) + len(snapshot.waiting)",
    ),
    ("if job.key in blocked or", "if False or"),  # FIFO per adapter
    ("(job.key is not None and job.key == draining)", "False"),  # draining holds new rows
    ("                reads.add(job.key)", "                pass"),
    ("elif job.tier is Tier.HOST and draining is None:", "elif draining is None:"),  # reads do not drain
    ("            draining = None  # the waiting adapter got its slot", "            pass"),
    ("    if not _any_waits(snapshot, left, waits):\n        draining = None", "    pass"),
    ("if key is not None and key not in pinned:", "if key is not None:"),
    ("return min(counts, key=counts.__getitem__)", "return max(counts, key=counts.__getitem__)"),
    ("self.idle.discard(job.key)  # in use now", "pass  # in use now"),
    ("job.key in self.given or job.tier", "job.tier"),
    ("        if self.free > 0:\n            self.free -= 1", "        if self.free > 0:\n            pass"),
    ("        elif self.idle:\n            self.idle.pop()", "        elif self.idle:\n            pass"),
    ("len(passed) >= LOOKAHEAD * snapshot.capacity", "False"),
    ("if job.whole or job.logprobs:", "if job.logprobs:"),
    ("if job.whole or job.logprobs:", "if job.whole:"),
    ("        elif budget <= 0:\n            continue", "        elif False:\n            continue"),
    (
        "take, spent = costs.piece(budget, job.computed, job.left, job.size)",
        "take = min(job.left, costs.fit(budget, job.computed)); spent = costs.work(take, job.computed)",
    ),
    ("spent = costs.work(take, job.computed)\n        sized", "spent = take\n        sized"),
    ("        elif packs:\n            how = How.PACKED", "        elif False:\n            how = How.PACKED"),
    ("elif finishes and len(finishing) >= 2:", "elif finishes:"),
    ("        if job.logprobs:\n            how = How.ALONE", "        if False:\n            how = How.ALONE"),
    ("take = min(job.left, costs.fit(budget, job.computed))", "take = min(job.left, int(budget))"),
    ("budget -= spent", "pass"),
    # tenants (_Shares)
    ("self.on = len(snapshot.shares) > 1", "self.on = False"),
    ("ring = after + [t for t in ring if t not in after]", "pass"),
    ("        capped = self._capped(tenant)\n", "        capped = False\n"),
    ("self.wanting = {t for t in wanting if not self._capped(t)}", "self.wanting = wanting"),
    ("        yields = held >= self.fair.get(tenant, 0.0) and any(", "        yields = False and any("),
    ("crowds = held >= self.guaranteed.get(tenant, 0.0) and free_after < RESERVE", "crowds = free_after < RESERVE"),
    ("crowds = held >= self.guaranteed.get(tenant, 0.0) and free_after < RESERVE", "crowds = False"),
    # (`self.full`, FIFO within a tenant, is not mutated: the rules refuse a refused tenant's
    # later requests anyway, so it only saves their checks.)
    ("        self.held[job.tenant] += 1", "        pass"),
]


def main() -> None:
    orig = SCHEDULER.read_text()
    try:
        survived = check(orig)
    finally:
        SCHEDULER.write_text(orig)
    print("survived", survived, "of", len(MUTATIONS))
    if survived:
        raise SystemExit(1)


def check(orig: str) -> list[int]:
    p, survived = SCHEDULER, []
    for i, (a, b) in enumerate(MUTATIONS):
        assert orig.count(a) >= 1, a
        p.write_text(orig.replace(a, b, 1))
        r = subprocess.run(
            [
                ".venv/bin/python",
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "tests/service/engine/test_scheduler.py",
            ],
            capture_output=True,
            text=True,
        )
        ok = r.returncode != 0
        print(("killed " if ok else "SURVIVED ") + str(i) + ": " + b.strip().splitlines()[0][:70])
        if not ok:
            survived.append(i)
    return survived


if __name__ == "__main__":
    main()
