"""``busagents llm watch|approve|reject``: the human side of LLM agents.

Decisions above an agent's approval threshold wait for an answer (``ApprovalRequested``);
cases the model could not decide are handed to people (``ReviewRequested``). ``watch``
prints both as they arrive; ``approve`` and ``reject`` answer a held decision.
"""

from __future__ import annotations

import asyncio
import getpass
import json

import click
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from ..bus import Bus
from ..codec import codec_for, encode
from ..contract import contract_info, subject_for
from ..envelope import Envelope
from ..errors import ConfigError, DecodeError
from ..llm.contracts import ApprovalDecided, ApprovalRequested, ReviewRequested
from ._nats import nats_option, nats_url


@click.group("llm")
def llm_group() -> None:
    """LLM agents: answer decisions held for approval, watch cases handed to humans."""


@llm_group.command("watch")
@nats_option
@click.option("--count", type=click.IntRange(1), default=None, help="Stop after this many messages.")
def watch_command(nats: str | None, count: int | None) -> None:
    """Print approval requests and review cases as they arrive (Ctrl-C to stop)."""
    approvals = codec_for(ApprovalRequested).decode
    reviews = codec_for(ReviewRequested).decode

    async def watch(url: str) -> None:
        bus = await Bus.connect(url, name="busagents-llm-watch")
        seen = 0
        done = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            nonlocal seen
            try:
                if msg.subject.startswith("busagents.llm.approval.requested."):
                    a = approvals(msg.data)
                    click.echo(
                        f"approval {a.request_id} from {a.agent}: {a.summary or a.decision_contract} "
                        f"(cost {a.cost:,.2f} > {a.threshold:,.2f}; expires in {a.expires_in:.0f}s)\n"
                        f"  decision: {json.dumps(a.decision, ensure_ascii=False)}\n"
                        f"  answer:   busagents llm approve {a.request_id}   |   busagents llm reject {a.request_id}"
                    )
                else:
                    r = reviews(msg.data)
                    click.echo(
                        f"review from {r.agent} ({r.decision_contract}): {r.reason}\n"
                        f"  case: {json.dumps(r.case, ensure_ascii=False)}"
                    )
            except DecodeError as exc:
                click.echo(f"unreadable message on {msg.subject}: {exc}", err=True)
            seen += 1
            if count is not None and seen >= count:
                done.set()

        try:
            await bus.nc.subscribe("busagents.llm.approval.requested.*", cb=on_msg)
            await bus.nc.subscribe("busagents.llm.review.*", cb=on_msg)
            await bus.flush()
            click.echo("watching approval requests and review cases", err=True)
            await done.wait()
        finally:
            await bus.close()

    with nats_url(nats) as url:
        asyncio.run(watch(url))


def _answer(nats: str | None, request_id: str, approved: bool, by: str, note: str) -> None:
    async def send(url: str) -> None:
        bus = await Bus.connect(url, name="busagents-llm-approval")
        answer = ApprovalDecided(request_id=request_id, approved=approved, by=by, note=note)
        info = contract_info(ApprovalDecided)
        envelope = Envelope.new(info.name, info.version, sender="busagents-llm-cli")
        try:  # a request: the agent holding the decision confirms it got the answer
            await bus.nc.request(subject_for(info, answer), encode(answer), timeout=10, headers=envelope.to_headers())
        except NoRespondersError:
            raise ConfigError(
                f"no agent is waiting for approval {request_id}: unknown, expired or already answered "
                "(see 'busagents llm watch')"
            ) from None
        except NatsTimeoutError:
            raise ConfigError(f"no agent confirmed approval {request_id} within 10s") from None
        finally:
            await bus.close()

    with nats_url(nats) as url:
        asyncio.run(send(url))
    click.echo(f"{'approved' if approved else 'rejected'} {request_id} as {by}")


@llm_group.command("approve")
@nats_option
@click.argument("request_id")
@click.option("--by", default=None, help="Who approves (default: the login name).")
@click.option("--note", default="", help="A note for the record.")
def approve_command(nats: str | None, request_id: str, by: str | None, note: str) -> None:
    """Approve the held decision REQUEST_ID: the agent publishes it."""
    _answer(nats, request_id, True, by or getpass.getuser(), note)


@llm_group.command("reject")
@nats_option
@click.argument("request_id")
@click.option("--by", default=None, help="Who rejects (default: the login name).")
@click.option("--note", required=True, help="Why: the agent records it with the case it hands to review.")
def reject_command(nats: str | None, request_id: str, by: str | None, note: str) -> None:
    """Reject the held decision REQUEST_ID: it is not applied and goes to human review."""
    _answer(nats, request_id, False, by or getpass.getuser(), note)
