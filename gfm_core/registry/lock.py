"""The ticket lock that serialises the promotions of one registered model, on any MLflow store."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gfm_core.errors import GfmError

log = logging.getLogger(__name__)

LEDGER_SUFFIX = ".promotions"  # <model>.promotions: the registered model whose versions are promotion tickets
TICKET_TAG = "gfm.ticket"  # open | done | expired
LEASE_S = 900.0  # the longest a promotion may hold its turn; a crashed one blocks the others this long at most


class RegistryConflictError(GfmError):
    """The champion alias moved while a promotion was being decided."""


@dataclass(frozen=True)
class PromotionTicket:
    """This process's turn to promote into ``models:/<name>``: version ``number`` of the ledger model.

    ``started``: ``time.monotonic()`` when the turn began (see :func:`promotion_turn` for the lease argument).
    """

    ledger: str
    number: str
    started: float
    lease_s: float

    def check(self, client: Any) -> None:
        """Raise unless the turn is still this process's: lease not (nearly) over, not expired by a waiter.

        Raises:
            RegistryConflictError: the lease ran out (another promotion may have taken over).
        """
        margin = min(60.0, self.lease_s / 10)
        held = time.monotonic() - self.started
        state = client.get_model_version(self.ledger, self.number).tags.get(TICKET_TAG)
        if held > self.lease_s - margin or state != "open":
            raise RegistryConflictError(
                f"models:/{self.ledger}/{self.number}: this promotion held its turn for {held:.0f} s (lease "
                f"{self.lease_s:.0f} s, ticket {state}); another promotion may have taken over, so nothing was "
                f"aliased; run the promotion again"
            )


@contextlib.contextmanager
def promotion_turn(
    client: Any, name: str, source: Any, *, lease_s: float = LEASE_S, poll_s: float = 0.05
) -> Iterator[PromotionTicket]:
    """Serialise the promotions of ``name``: one at a time, in the order they asked, on any MLflow store.

    MLflow has no compare-and-set, but it numbers the versions of a registered model atomically (a unique
    ``(name, version)`` key, retried on conflict, in the sqlite/SQL stores and behind a tracking server alike).
    So each promotion takes a *ticket*, a new version of the ledger model ``<name>.promotions`` tagged
    ``gfm.ticket=open``, and waits until every lower ticket is ``done`` (a ticket lock). A lock file would only
    serialise processes sharing one file system, not clients of a server; a tag written then read back is
    not a compare-and-set (two writers can each read back their own value before the other writes).

    A ticket whose holder died stays ``open``: a waiter that has seen it as the earliest open ticket for
    ``lease_s`` seconds by its own clock marks it ``expired`` and goes on. The holder's lease starts when it
    sees no earlier open ticket, at most a poll before any waiter can see it as the earliest (no clocks are
    compared across machines); it checks the lease, with a margin, before it moves the alias
    (:meth:`PromotionTicket.check`). The ledger doubles as an audit log (who promoted what, with which outcome).

    Args:
        source: the candidate's model version (its ``source``/``run_id`` become the ticket's, which a tracking
            server accepts as a model version source).
        lease_s: how long a turn may last; a crashed holder blocks the others this long at most.
        poll_s: base interval between looks at the earlier tickets (jittered).
    """
    import os
    import random
    import socket

    from mlflow.exceptions import MlflowException

    ledger = f"{name}{LEDGER_SUFFIX}"
    try:
        client.create_registered_model(ledger, description=f"Promotion tickets of {name} (gfm_core.registry)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    owner = f"{socket.gethostname()}:{os.getpid()}"
    mv = client.create_model_version(
        ledger, source=source.source, run_id=source.run_id or None,
        tags={TICKET_TAG: "open", "gfm.ticket_owner": owner, "gfm.ticket_for": f"{name}/{source.version}"},
    )
    number, outcome = str(mv.version), "error"
    try:
        lowest: tuple[int, float] | None = None  # the earliest open ticket, since when this process has seen it
        while True:
            looked = time.monotonic()
            earlier = sorted(int(v.version) for v in client.search_model_versions(
                f"name = '{ledger}' AND tags.`{TICKET_TAG}` = 'open'") if int(v.version) < int(number))
            if not earlier:
                break
            if lowest is None or lowest[0] != earlier[0]:
                lowest = (earlier[0], looked)
            elif looked - lowest[1] > lease_s:
                client.set_model_version_tag(ledger, str(lowest[0]), TICKET_TAG, "expired")
                client.set_model_version_tag(ledger, str(lowest[0]), "gfm.ticket_expired_by", owner)
                log.warning("models:/%s/%d held the turn for over %.0f s: its holder is gone, marked expired",
                            ledger, lowest[0], lease_s)
            time.sleep(poll_s * (1 + random.random()))
        yield PromotionTicket(ledger, number, looked, lease_s)
        outcome = "done"
    finally:
        client.set_model_version_tag(ledger, number, "gfm.ticket_outcome", outcome)
        client.set_model_version_tag(ledger, number, TICKET_TAG, "done")
