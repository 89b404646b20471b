"""Reproducible benchmarks of busagents against raw nats-py and FastStream, in the same run.

Run them with ``python -m benchmarks`` (or ``make bench``); results go to ``benchmarks/RESULTS.md``.
Kept free of imports: benchmark agent processes import ``benchmarks.contracts`` and
their idle memory is measured.
"""
