"""bench.step on the tiny model: every mode runs and reports a step time, and the static cache's
first step computes what the dynamic cache's does."""

from __future__ import annotations

import json

from bench.step import main


def test_bench_step_reports_each_mode(tiny, cache_dir, capsys):
    assert (
        main(
            [
                "--model",
                str(tiny.base_dir),
                "--quantization",
                "fp32",
                "--device",
                "cpu",
                "--cache-dir",
                str(cache_dir),
                "--rows",
                "1,3",
                "--prompt-tokens",
                "8",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["rows"], r["mode"]): r for r in report["rows"]}
    for n in (1, 3):
        assert rows[(n, "dynamic")]["step_ms"] > 0
        static = rows[(n, "static")]
        assert static["same_argmax"] and static["max_abs_diff_vs_dynamic"] < 1e-4  # fp32
        assert rows[(n, "graphs")]["skipped"]  # no CUDA here
