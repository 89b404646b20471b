"""The reference app uses busagents, and its own modules, through their public names only."""

from __future__ import annotations

import re
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "agents"

PRIVATE = {
    "a private busagents module": re.compile(r"\bbusagents(\.\w+)*\._\w+"),
    "a private busagents name": re.compile(r"from busagents[\w.]* import [^\n]*\b_\w+"),
    "another object's private method": re.compile(r"(?<!\bself)(?<!\bcls)(?<!\bsuper\(\))\._[a-z]\w*\("),
}


def test_the_flight_app_reaches_into_no_private_code() -> None:
    found = [
        f"{path.relative_to(APP)}:{n}: {what}: {line.strip()}"
        for path in sorted(APP.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for what, pattern in PRIVATE.items()
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
