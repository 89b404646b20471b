"""Each benchmark runs end to end with tiny counts and yields well-formed rows (it measures nothing)."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import scaleout
from benchmarks.proc import ShortReceive, spawn
from benchmarks.report import Machine, render, write_results
from benchmarks.runner import BENCHMARKS, QUICK, run_all
from busagents.server import NatsServer

ROOT = Path(__file__).resolve().parents[1]


def _has_history() -> bool:
    """Whether this copy's git history has the commit the scale-out benchmark's baseline comes from."""
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", scaleout.BASELINE_COMMIT], check=False)
    return found.returncode == 0


@pytest.mark.parametrize("name", [name for name in BENCHMARKS if name != "scaleout"])
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


@pytest.mark.timeout(300)
async def test_scaleout_runs_the_day_four_ways_and_reports_every_figure(tmp_path: Path) -> None:
    # Its figures may be 0 at tiny counts (CPU-s of a stage that did little), so only their presence is checked.
    machine = Machine.probe()
    results, checks, methods = await run_all(["scaleout"], QUICK, 1, machine, lambda line: None)

    rows = {r.variant: r for r in results}
    assert all(r.benchmark == scaleout.NAME and len(r.samples) == 1 for r in results)
    assert all(math.isfinite(s) and s >= 0 for r in results for s in r.samples)
    history = _has_history()
    for mode, label in scaleout.LABELS.items():
        if mode == scaleout.BASELINE and not history:  # a copy without the history the baseline comes from
            assert f"{label}: run time" not in rows
            continue
        run = rows[f"{label}: run time"]
        assert run.samples[0] > 0 and (run.ratio is None) == (mode == scaleout.BASELINE)
        for field in ("affected", "notified", "seat conflicts", "stranded", "re-decisions", "dead letters"):
            assert field in run.note
        assert rows[f"{label}: wall time of the command"].samples[0] > 0
        assert rows[f"{label}: CPU per affected passenger"].metric == "CPU-ms"
        stages = [f"{label}: {stage}" for stage in scaleout.STAGES]
        if mode in (0, scaleout.BASELINE):
            assert not any(stage in rows for stage in stages)  # one process, or the figure of the past: no stages
        else:
            assert all(
                rows[stage].metric == "CPU-s" and "CPU-ms per affected passenger" in rows[stage].note
                for stage in stages
            )
            assert all("msgs handled" in rows[f"{label}: {agent}"].note for agent in scaleout.AGENTS)
            fresh = rows[f"{label}: a fresh flight-context replica after the day, start to serving queries"]
            assert fresh.samples[0] > 0 and "replaying the streams" in fresh.note
    assert [c.target.split(",")[0] for c in checks] == [
        "Flight day run time",
        "Flight day run time",
        "CPU-ms per affected passenger",
        "Scale-out runs with notified == affected",
    ]
    assert "on one core" in checks[1].target
    assert all(math.isfinite(c.measured) for c in checks)
    assert (f"commit {scaleout.BASELINE_COMMIT}), measured in this run" in checks[2].detail) == history
    assert checks[3].met, checks[3].detail  # every passenger told, no seat sold twice
    # the one-core swarm's processes were held to one core, the others to none (on a machine with more than one)
    assert rows[f"{scaleout.LABELS[scaleout.ONE_CORE]}: run time"].note.endswith("on 1 core(s)")
    if len(os.sched_getaffinity(0)) > 1:
        assert rows[f"{scaleout.LABELS[1]}: run time"].note.endswith(f"on {len(os.sched_getaffinity(0))} core(s)")
    assert machine.other_load["scaleout"][0] > 0

    out = tmp_path / "RESULTS.md"
    write_results(out, render(machine, results, checks, methods[0], 1))
    assert "**Flight swarm scale-out.**" in out.read_text()


def test_rewriting_results_keeps_sections_the_runner_does_not_write(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    flight = "## Flight assistant at scale\n\n| flights | passengers |\n| --- | --- |\n| 2000 | 200000 |\n"
    out.write_text("# Benchmark results\n\n## Results\n\nold table\n\n" + flight + "\n## Tracing overhead\n\nx\n")

    write_results(out, "# Benchmark results\n\n## Results\n\nnew table\n")

    text = out.read_text()
    assert "new table" in text and "old table" not in text
    assert flight in text and "## Tracing overhead\n\nx\n" in text
    assert text.index("new table") < text.index("## Flight assistant at scale")


async def test_a_receiver_that_misses_messages_reports_how_many_it_got_instead_of_hanging(
    nats_server: NatsServer,
) -> None:
    # Core NATS may drop messages under load; the throughput benchmark then runs the variant once more.
    child = await spawn(
        "-m", "benchmarks.child", "receive", "nats-py", "--url", nats_server.url,
        "--warmup", "5", "--count", "10", "--timeout", "0.5",
    )  # fmt: skip
    await child.ready()
    with pytest.raises(ShortReceive, match=r"received 0 of 15 within 0.5s"):
        await child.result(timeout=30)
