"""Each benchmark runs end to end with tiny counts and yields well-formed rows (it measures nothing)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.report import Machine, render, write_results
from benchmarks.runner import BENCHMARKS, QUICK, run_all


@pytest.mark.parametrize("name", list(BENCHMARKS))
async def test_benchmark_runs_with_tiny_counts_and_gives_well_formed_rows(name: str, tmp_path: Path) -> None:
    machine = Machine.probe()
    results, checks, methods = await run_all([name], QUICK, 1, machine, lambda line: None)

    assert results and checks and len(methods) == 1
    for result in results:
        assert result.benchmark and result.variant and result.metric
        assert len(result.samples) == 1
        assert all(math.isfinite(s) and s > 0 for s in result.samples), result
    for check in checks:
        assert math.isfinite(check.measured) and check.measured > 0, check
    wall, other, steal = machine.other_load[name]
    assert wall > 0 and other >= 0 and steal >= 0

    out = tmp_path / "RESULTS.md"
    write_results(out, render(machine, results, checks, methods[0], 1))
    text = out.read_text()
    assert "## Machine" in text and "## Results" in text and "## Targets" in text
    assert all(r.variant in text for r in results)


def test_rewriting_results_keeps_sections_the_runner_does_not_write(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    flight = "## Flight assistant at scale\n\n| flights | passengers |\n| --- | --- |\n| 2000 | 200000 |\n"
    out.write_text("# Benchmark results\n\n## Results\n\nold table\n\n" + flight + "\n## Tracing overhead\n\nx\n")

    write_results(out, "# Benchmark results\n\n## Results\n\nnew table\n")

    text = out.read_text()
    assert "new table" in text and "old table" not in text
    assert flight in text and "## Tracing overhead\n\nx\n" in text
    assert text.index("new table") < text.index("## Flight assistant at scale")
