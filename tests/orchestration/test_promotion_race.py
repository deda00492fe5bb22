"""Concurrent promotions, each in its own process, against one real MLflow sqlite store."""

from __future__ import annotations

import multiprocessing as mp
import time

import mlflow
import pytest
from helpers.promotion import promotion_worker, sha_of

from gfm_core import registry
from gfm_core.config import PromoteCfg

pytestmark = pytest.mark.distributed  # several processes


def _register(client, name: str, arp: float | None = None) -> str:
    v = client.create_model_version(name, source=f"file:///nowhere/{name}", tags={"gfm.stage": "test"})
    client.set_model_version_tag(name, v.version, "gfm.weights_sha256", sha_of(v.version))
    if arp is not None:  # a champion judged on point estimates, without evidence
        client.set_model_version_tag(name, v.version, "gfm.arp", str(arp))
        client.set_model_version_tag(name, v.version, "gfm.gate", "passed")
    return str(v.version)


@pytest.mark.parametrize("trials", [20, pytest.param(100, marks=pytest.mark.slow)])
def test_concurrent_promotions_leave_the_better_model_champion(store, trials):
    """Champion v1 (ARP 10); two processes promote v2 (ARP 12) and v3 (ARP 15) at once. Both beat v1, so
    without serialisation both pass against v1 and the later alias write wins, whichever model it is."""
    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["helpers.promotion", "mlflow", "gfm_core.registry"])  # imported once, then forked
    jobs = [ctx.Queue(), ctx.Queue()]
    results, barrier = ctx.Queue(), ctx.Barrier(2)
    workers = [ctx.Process(target=promotion_worker, args=(uri, q, results, barrier), daemon=True) for q in jobs]
    for w in workers:
        w.start()
    outcomes = {"worse judged first": 0, "better judged first": 0}
    try:
        for trial in range(trials):
            name = f"race-{trial}"
            client.create_registered_model(name)
            champion = _register(client, name, arp=10.0)
            client.set_registered_model_alias(name, "champion", champion)
            worse, better = _register(client, name), _register(client, name)
            pair = [(name, worse, 12.0), (name, better, 15.0)][:: 1 if trial % 2 else -1]
            for q, job in zip(jobs, pair, strict=True):
                q.put(job)
            got = {v: (promoted, reasons, err) for _, v, promoted, reasons, err in
                   (results.get(timeout=180) for _ in pair)}
            assert [err for *_, err in got.values()] == [None, None], got
            assert str(client.get_model_version_by_alias(name, "champion").version) == better, (trial, got)
            tags = {v: client.get_model_version(name, v).tags for v in (champion, worse, better)}
            assert tags[better]["gfm.gate"] == "passed"
            if tags[worse]["gfm.gate"] == "refused":  # judged after the better one: it loses to it, and says so
                outcomes["better judged first"] += 1
                assert tags[worse]["gfm.champion_before"] == better
                assert f"does not beat champion v{better}'s +15.00" in tags[worse]["gfm.gate_reasons"]
                assert tags[champion]["gfm.superseded_by"] == better
            else:  # judged first: it won against v1, then the better one superseded it
                outcomes["worse judged first"] += 1
                assert tags[worse]["gfm.gate"] == "passed" and tags[worse]["gfm.superseded_by"] == better
                assert tags[better]["gfm.champion_before"] == worse
        ledger = client.search_model_versions(f"name = 'race-{trials - 1}{registry.LEDGER_SUFFIX}'")
        assert sorted(v.tags[registry.TICKET_TAG] for v in ledger) == ["done", "done"]
    finally:
        for q in jobs:
            q.put(None)
        for w in workers:
            w.join(timeout=30)
    print(f"{trials} trials: {outcomes}")


def test_judging_the_champion_again_keeps_its_verdict(store):
    client = mlflow.MlflowClient()
    client.create_registered_model("gfm-foundation")
    v = _register(client, "gfm-foundation")
    evaluation = registry.Evaluation("gfm", {"gfm": 5.0, "imagenet": 0.0}, "imagenet", {}, {}, weights_sha256=sha_of(v))
    assert registry.promote(client, "gfm-foundation", v, evaluation, PromoteCfg()).promoted
    before = client.get_model_version("gfm-foundation", v).tags
    worse = registry.Evaluation("gfm", {"gfm": -1.0, "imagenet": 0.0}, "imagenet", {}, {}, weights_sha256=sha_of(v))
    again = registry.promote(client, "gfm-foundation", v, worse, PromoteCfg())
    assert not again.promoted and again.method == "already-champion"
    assert client.get_model_version("gfm-foundation", v).tags == before  # still "passed", with its own numbers
    assert str(client.get_model_version_by_alias("gfm-foundation", "champion").version) == v


def test_a_ticket_left_open_by_a_dead_promotion_expires(store):
    client = mlflow.MlflowClient()
    client.create_registered_model("gfm-foundation")
    v = _register(client, "gfm-foundation")
    with registry.promotion_turn(client, "gfm-foundation", client.get_model_version("gfm-foundation", v)) as dead:
        pass  # its finally marks it done; reopen it as if its process had been killed inside
    client.set_model_version_tag(dead.ledger, dead.number, registry.TICKET_TAG, "open")
    t0 = time.monotonic()
    with registry.promotion_turn(client, "gfm-foundation", client.get_model_version("gfm-foundation", v),
                                 lease_s=2.0) as turn:
        waited = time.monotonic() - t0
        turn.check(client)  # a fresh lease: the wait does not count
    assert 2.0 <= waited < 15 and int(turn.number) > int(dead.number)
    tags = client.get_model_version(dead.ledger, dead.number).tags
    assert tags[registry.TICKET_TAG] == "expired" and tags["gfm.ticket_expired_by"]
    with pytest.raises(registry.RegistryConflictError, match="lease"):  # a holder past its lease aliases nothing
        with registry.promotion_turn(client, "gfm-foundation", client.get_model_version("gfm-foundation", v),
                                     lease_s=0.5) as late:
            time.sleep(0.6)
            late.check(client)
