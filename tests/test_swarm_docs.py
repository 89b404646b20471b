"""``busagents swarm docs -o DIR``: a self-contained HTML page of the swarm, with its asyncapi.json."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from click.testing import CliRunner

from busagents.cli import cli
from busagents.plugins import load_agent
from busagents.swarm import Graph, load_swarm
from busagents.swarm.docs import render_html

ROOT = Path(__file__).resolve().parent.parent
FLIGHT = ROOT / "deploy" / "flight-swarm.toml"
_VOID = {"meta", "link", "br", "hr", "img", "input", "wbr", "source", "col", "area", "base", "embed", "track"}


class _Checker(HTMLParser):
    """Collects ids, links and external resources, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self.open: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(str(values["id"]))
        if tag == "a" and values.get("href"):
            self.links.append(str(values["href"]))
        for attr in ("src", "href"):
            value = values.get(attr) or ""
            if (tag != "a" and value) or value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1] if self.open else 'nothing'}>")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert page.startswith("<!DOCTYPE html>")
    assert checker.errors == [] and checker.open == [], (checker.errors, checker.open)
    assert len(checker.ids) == len(set(checker.ids)), "duplicate ids"
    anchors = {link[1:] for link in checker.links if link.startswith("#")}
    assert anchors - set(checker.ids) == set(), "links to missing anchors"
    assert {link for link in checker.links if not link.startswith("#")} == {"asyncapi.json"}
    assert checker.external == [], "the page must load nothing from elsewhere"
    return checker


def test_swarm_docs_writes_a_page_of_every_agent_and_contract_of_the_flight_swarm(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    result = CliRunner().invoke(
        cli, ["swarm", "docs", str(FLIGHT), "-o", str(out), "--nats", "nats://nats.example:4333"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "asyncapi.json").read_text())
    agents = [load_agent(target) for target in load_swarm(FLIGHT).targets().values()]
    assert doc == Graph(agents).asyncapi(title="flight-swarm", nats_url="nats://nats.example:4333")
    checker = _check((out / "index.html").read_text())
    for agent in agents:
        assert f"agent-{agent.name}" in checker.ids
    contracts = [name for name, channel in doc["channels"].items() if "x-busagents" in channel]
    assert "FlightDelayed" in contracts and "BookingsOnFlight" in contracts
    for name in contracts:
        assert f"contract-{name}" in checker.ids
        assert f"#contract-{name}" in checker.links  # reachable from the flows table
    text = " ".join(checker.text)
    assert "busagents.dlq.{agent}" in text and "Ba-Dlq-Reason" in text
    assert "nats://nats.example:4333" in text


def test_the_page_escapes_what_it_shows() -> None:
    doc = Graph([]).asyncapi(title="<script>alert(1)</script>")
    page = render_html(doc)
    assert "<script>" not in page and "&lt;script&gt;" in page
    _check(page)
