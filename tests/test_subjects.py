"""The subject namespace busagents reserves is spelled in busagents/subjects.py only."""

from __future__ import annotations

import ast
from pathlib import Path

import busagents
from busagents.subjects import DLQ_SUBJECTS, dead_letter_subject, inbox_prefix, is_reserved, stats_subject

PACKAGE = Path(busagents.__file__).parent
RESERVED_SPELLINGS = ("busagents.stats", "busagents.dlq", "_INBOX")


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    """Every string in the code, docstrings left out (they may name a subject to explain it)."""
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)  # type: ignore[attr-defined]
        for node in ast.walk(tree)
        if isinstance(node, documented) and ast.get_docstring(node, clean=False) is not None
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_but_subjects_spells_a_reserved_subject() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "subjects.py"
        for line, text in _strings(ast.parse(path.read_text(), str(path)))
        if any(s in text for s in RESERVED_SPELLINGS)
    ]
    assert not found, "use busagents.subjects instead:\n" + "\n".join(found)


def test_the_namespace() -> None:
    assert stats_subject("pricer") == "busagents.stats.pricer"
    assert dead_letter_subject("pricer") == "busagents.dlq.pricer"
    assert DLQ_SUBJECTS == "busagents.dlq.>"
    assert inbox_prefix("pricer") == "_INBOX.pricer"
    assert is_reserved("busagents.dlq") and is_reserved("busagents.stats.x")
    assert not is_reserved("busagents.dlqs") and not is_reserved("travel.busagents.dlq")
