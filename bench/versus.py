"""`python -m bench.versus`: a bench against another commit, in one run, rounds alternating.

    python -m bench.versus --ref 6d49da4 --rounds 2 -- bench.throughput --clients 16

Both commits (--ref, and --this: HEAD by default) are checked out in temporary git worktrees,
so edits made while it runs change neither; each round runs the bench (and the services it
starts) from each tree in turn, in the other order every other round (on this noisy machine
the second of a pair tends to come out slower). Every numeric figure of the JSON line the bench
prints last is paired, and the median over rounds of --this's figure over --ref's is printed
for each: a ratio measured in one run.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="the commit to compare against (any git revision)")
    p.add_argument("--this", default="HEAD", help="the commit measured against it (default HEAD)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the bench module and its arguments")
    return p


def run(tree: Path, bench: list[str]) -> dict:
    """The bench from `tree` (its code and the services it starts): the JSON line it printed last."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-m", *bench], cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(bench)} failed in {tree} ({out.returncode})")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def figures(value, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path (list items by index)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {path: float(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found: dict[str, float] = {}
    for key, item in items:
        found.update(figures(item, f"{path}.{key}" if path else str(key)))
    return found


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    bench = [a for a in args.bench if a != "--"]
    if not bench:
        raise SystemExit("name the bench after --, e.g. -- bench.throughput --clients 16")
    with tempfile.TemporaryDirectory(prefix="hotswap-versus-") as folder:
        this, ref = Path(folder) / "this", Path(folder) / "ref"
        for tree, rev in ((this, args.this), (ref, args.ref)):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            ratios: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                order = (this, ref) if round_ % 2 == 0 else (ref, this)
                got = {tree: figures(run(tree, bench)) for tree in order}
                for key, new in got[this].items():
                    old = got[ref].get(key)
                    if old:
                        ratios.setdefault(key, []).append(new / old)
        finally:
            for tree in (this, ref):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n{args.this} / {args.ref}, median of {args.rounds} alternating rounds: {' '.join(bench)}")
    for key, values in ratios.items():
        print(f"  {key:50s} {statistics.median(values):7.3f}   ({', '.join(f'{v:.3f}' for v in values)})")
    print(json.dumps({"bench": "versus", "this": args.this, "ref": args.ref, "args": bench, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
