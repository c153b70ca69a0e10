"""Virtual PBX: a fair share of history uploads across tenants, and reloads that lose or reorder no card.

Each tenant has its own strict fake retailCRM on loopback; backlogs are written to the outbox file before
fsbridge starts (as a restart after a long outage leaves them), live calls come from the FreeSWITCH
simulator with the tenant's DID on the wire."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import textwrap
import time

import gevent
import pytest

from fsbridge import config, history
from fsbridge.history.outbox import Outbox
from fsbridge.service import Bridge
from tests.conftest import run_bridge, settings
from tests.fakes.retailcrm import FakeRetailCRM
from tests.test_history_outbox import make_call
from tests.waiting import until

NAMES = ("a", "b", "c", "d", "e")
CAPTURED_DIDS = ("74999999999", "74999999998")


def did(name: str, n: int) -> str:
    return f"749510000{NAMES.index(name)}{n}" if name in NAMES else CAPTURED_DIDS[n - 1]


def key(name: str) -> str:
    return f"{name}-api-key-0123456789"


def tenant_yaml(name: str, crm_url: str, *, api_key: str | None = None, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        domains: [{name}.pbx.example.com]
        crm: {{url: "{crm_url}", api_key: "{api_key or key(name)}", timezone: Europe/Moscow, card_max_age: 5}}
        integration: {{client_id: "{name}-client-id-0123456789abcdef"}}
        managers: {{"100": 1, "200": 2}}
        external_phones: {{"{did(name, 1)}": shop1, "{did(name, 2)}": shop1}}
        """) + extra


def crm_for(name: str) -> FakeRetailCRM:
    return FakeRetailCRM(api_key=key(name), known_codes={"100", "200"}, known_user_ids={1, 2},
                         known_sites={"shop1"}).start()


def wire(name: str) -> dict[str, str]:
    """A captured inbound call made `name`'s: its DID on the wire."""
    return {f'"Caller-Destination-Number":"{old}"': f'"Caller-Destination-Number":"{did(name, n)}"'
            for n, old in enumerate(CAPTURED_DIDS, 1)}


def uploaded(crm: FakeRetailCRM) -> list[dict]:
    return [c for u in crm.uploads for c in u.calls]


@pytest.fixture
def crms():
    started: dict[str, FakeRetailCRM] = {}

    def get(name: str) -> FakeRetailCRM:
        if name not in started:
            started[name] = crm_for(name)
        return started[name]

    yield get
    for crm in started.values():
        crm.stop()


@pytest.fixture
def fleet(tmp_path, simulator, crms):
    """fleet(names, workers=N, backlog={name: calls}) -> a started Bridge over those tenants."""
    tenants_dir = tmp_path / "tenants.d"
    tenants_dir.mkdir()
    started: list[Bridge] = []

    def start(names: tuple[str, ...], *, workers: int | None = None, backlog: dict[str, int] | None = None,
              files: dict[str, str] | None = None) -> Bridge:
        for name in names:
            text = (files or {}).get(name) or tenant_yaml(name, crms(name).url)
            (tenants_dir / f"{name}.yaml").write_text(text)
        raw = settings(fs_port=simulator.port, state_dir=str(tmp_path / "state"))
        for k in ("managers", "external_phones"):
            del raw[k]
        raw["crm"] = {"timezone": "Europe/Moscow", "timeout": 2.0}
        raw["history"] = {"retry_max_delay": 1.0, **({"upload_workers": workers} if workers else {})}
        raw["tenants_dir"] = str(tenants_dir)
        cfg = config.from_mapping(raw, env={})
        if backlog:
            # Written in tenant order, one tenant's whole backlog after the other: first come first served
            # would deliver them in that order.
            with Outbox(history.outbox_path(cfg)) as outbox:
                n = 0
                for name, count in backlog.items():
                    calls = [dataclasses.replace(make_call(n + i, external_phone=did(name, 1)),
                                                 call_id=f"{name}-{n + i:05d}", tenant=name) for i in range(count)]
                    outbox.add_many(calls)
                    n += count
        return run_bridge(cfg, simulator, started)

    start.dir = tenants_dir  # type: ignore[attr-defined]
    yield start
    for bridge in started:
        bridge.stop()


class UploadsInFlight:
    """The most upload requests the fake CRMs were handling at once (sampled): the workers' bound."""

    def __init__(self, crms: list[FakeRetailCRM]) -> None:
        self.most = 0
        self._crms = crms
        self._sampler = gevent.spawn(self._sample)

    def _sample(self) -> None:
        while True:
            now = sum(1 for crm in self._crms for r in list(crm.requests)
                      if r.path.endswith("/calls/upload") and r.status == 0)
            self.most = max(self.most, now)
            gevent.sleep(0.005)

    def stop(self) -> int:
        self._sampler.kill()
        return self.most


def upload_order(crms_by_name: dict[str, FakeRetailCRM]) -> list[str]:
    """Which tenant each upload request was for, in the order the fake CRMs received them."""
    seen = [(u.received, name) for name, crm in crms_by_name.items() for u in crm.uploads]
    return [name for _, name in sorted(seen)]


# -- a fair share of history uploads ----------------------------------------------------------------------


def test_backlogged_tenants_take_turns_one_batch_each(fleet, crms) -> None:
    """Three tenants with 3 batches each waiting, one upload worker: a, b, c, a, b, c, ... never a's
    whole backlog first although it was written first."""
    fleet(("a", "b", "c"), workers=1, backlog={"a": 150, "b": 150, "c": 120})
    by_name = {n: crms(n) for n in ("a", "b", "c")}
    until(lambda: sum(len(uploaded(c)) for c in by_name.values()) == 420, timeout=30, what="every backlog")
    order = upload_order(by_name)
    assert order == ["a", "b", "c"] * 3, order
    for name, crm in by_name.items():
        ids = [c["externalId"] for c in uploaded(crm)]
        assert len(ids) == len(set(ids)) and all(i.startswith(name + "-") for i in ids)


def test_small_tenants_go_after_at_most_one_batch_of_a_big_backlog(fleet, crms, simulator) -> None:
    crms("a").latency = 0.1   # a's 40 batches take seconds: long enough to see who goes meanwhile
    in_flight = UploadsInFlight([crms(n) for n in ("a", "b", "c")])
    bridge = fleet(("a", "b", "c"), workers=1, backlog={"a": 2000, "b": 1, "c": 1})
    until(lambda: uploaded(crms("b")) and uploaded(crms("c")), timeout=10, what="b's and c's backlog")
    order = upload_order({n: crms(n) for n in ("a", "b", "c")})
    assert order[:3].count("a") <= 1 and {"b", "c"} <= set(order[:3]), order
    # A call of b that ends while a is still draining goes next in the ring, not after a's 2 000.
    played = simulator.play("inbound_answered", None, wire("b"))
    until(lambda: len(uploaded(crms("b"))) == 2, timeout=10, what="b's live call")
    assert uploaded(crms("b"))[1]["externalId"] == played.a_leg
    assert len(uploaded(crms("a"))) < 2000 and bridge.outbox.pending_by_tenant().get("a", 0) > 0
    until(lambda: len(uploaded(crms("a"))) == 2000, timeout=60, what="a's backlog")
    assert len({c["externalId"] for c in uploaded(crms("a"))}) == 2000
    assert in_flight.stop() == 1   # one worker: one upload at a time, whoever's


def test_a_slow_crm_holds_one_worker_and_does_not_delay_another_tenant(fleet, crms, simulator) -> None:
    """a's CRM answers in 3 s (within its timeout), b's at once: with two workers, b's calls are in its
    history while a's first upload is still waiting for its answer."""
    slow = crms("a")
    slow.latency = 3.0
    files = {"a": tenant_yaml("a", slow.url).replace("card_max_age: 5", "card_max_age: 5, timeout: 10")}
    fleet(("a", "b"), workers=2, backlog={"a": 500}, files=files)
    until(lambda: any(r.path.endswith("/calls/upload") for r in slow.requests), what="a's first upload")
    played = [simulator.play("inbound_answered", None, wire("b")) for _ in range(3)]
    until(lambda: len(uploaded(crms("b"))) == 3, timeout=10, what="b's history")
    assert {c["externalId"] for c in uploaded(crms("b"))} == {p.a_leg for p in played}
    first = next(r for r in slow.requests if r.path.endswith("/calls/upload"))
    assert first.status == 0 and slow.uploads == [], "b waited for a's slow answer"
    uploads_in_flight = [r for r in slow.requests if r.path.endswith("/calls/upload") and r.status == 0]
    assert len(uploads_in_flight) == 1   # a slow CRM holds one worker, not both
    slow.latency = 0.0
    until(lambda: len(slow.calls) == 500, timeout=60, what="a's backlog once its CRM is quick again")


def test_many_slow_crms_get_at_most_half_the_workers(fleet, crms, simulator) -> None:
    """Three tenants whose CRMs answer in 1.5 s, each with a backlog, and two workers: once they are known to
    be slow they share one worker between them, and the healthy tenant keeps the other."""
    slow = ("a", "c", "d")
    for name in slow:
        crms(name).latency = 1.5
    files = {n: tenant_yaml(n, crms(n).url).replace("card_max_age: 5", "card_max_age: 5, timeout: 10")
             for n in slow}
    fleet(("a", "b", "c", "d"), workers=2, backlog={n: 200 for n in slow}, files=files)
    until(lambda: all(crms(n).uploads for n in slow), timeout=20, what="one answered upload of each slow tenant")
    in_flight = UploadsInFlight([crms(n) for n in slow])
    played = [simulator.play("inbound_answered", None, wire("b")) for _ in range(3)]
    until(lambda: len(uploaded(crms("b"))) == 3, timeout=10, what="the healthy tenant's history")
    gevent.sleep(2.0)   # a few more slow turns
    assert in_flight.stop() == 1
    assert {c["externalId"] for c in uploaded(crms("b"))} == {p.a_leg for p in played}


def test_a_rejected_key_skips_the_tenant_without_holding_the_only_worker(fleet, crms, simulator) -> None:
    crms("a").api_key = "the-key-was-revoked-0123"
    crms("a").latency = crms("b").latency = 0.1
    in_flight = UploadsInFlight([crms("a"), crms("b")])
    bridge = fleet(("a", "b"), workers=1, backlog={"a": 200})
    until(lambda: bridge.companies.get("a").key.rejections >= 1, what="a's key refused")
    played = [simulator.play("inbound_answered", None, wire("b")) for _ in range(2)]
    until(lambda: len(uploaded(crms("b"))) == 2, timeout=10, what="b's history while a's key is refused")
    assert {c["externalId"] for c in uploaded(crms("b"))} == {p.a_leg for p in played}
    # Stored by b's CRM, then marked sent once fsbridge has read the reply: wait for both (CI saw {'b': 2} left).
    until(lambda: bridge.outbox.pending_by_tenant() == {"a": 200}, what="b's calls marked sent")
    assert crms("a").calls == {}
    assert in_flight.stop() == 1
    crms("a").api_key = key("a")
    # Stored by the CRM, then marked sent once fsbridge has read the reply: wait for both.
    until(lambda: len(crms("a").calls) == 200 and bridge.outbox.pending_by_tenant() == {}, timeout=30,
          what="a's calls once its key works again")
    assert len(uploaded(crms("a"))) == 200


def test_waiting_and_drained_lines_count_the_tenants_own_calls(fleet, crms, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fsbridge.history")
    crms("a").outage = "html503"
    # 7 calls of a tenant no longer configured wait in the same outbox file: they are nobody's backlog here.
    bridge = fleet(("a",), backlog={"a": 3, "gone": 7})
    bridge.companies.get("a").history.waiting_after = 0.5
    until(lambda: "call history is waiting on the CRM" in caplog.text, timeout=15, what="the waiting line")
    line = next(r.getMessage() for r in caplog.records if "waiting on the CRM" in r.getMessage())
    assert ": 3 call(s) wait in the outbox" in line, line
    crms("a").outage = None
    until(lambda: "call history drained" in caplog.text, timeout=15, what="the drained line")
    assert bridge.outbox.pending_by_tenant() == {"gone": 7}


def test_periodic_and_switched_off_tenants_keep_their_ways_under_the_scheduler(fleet, crms, simulator) -> None:
    """What each uploader did on its own still holds with shared workers: a periodic tenant's backlog goes at
    start, then its calls wait for the tick; a tenant retailCRM switched off keeps its calls until it is back
    on; an immediate tenant is served meanwhile."""
    # A 12 s period: the calls below are played and checked well before its first tick, also on a loaded machine.
    files = {"a": tenant_yaml("a", crms("a").url, extra="history: {strategy: periodic, period: 0.2}\n")}
    started = time.monotonic()
    bridge = fleet(("a", "b", "c"), workers=1, backlog={"a": 3}, files=files)
    until(lambda: len(uploaded(crms("a"))) == 3, what="the periodic tenant's backlog at start")
    # Its start-up turn over too: a call written while the turn still runs goes with it (what accumulated).
    until(lambda: bridge.companies.scheduler.in_flight == 0 and bridge.outbox.pending_by_tenant() == {},
          what="the start-up turn to end")
    bridge.companies.get("c").activity.set(False, False)
    plays = {name: simulator.play_async("inbound_answered", None, wire(name)) for name in ("a", "b", "c")}
    gevent.joinall(list(plays.values()), raise_error=True)
    played = {name: play.value for name, play in plays.items()}
    until(lambda: len(uploaded(crms("b"))) == 1, timeout=10, what="the immediate tenant's call")
    gevent.sleep(1.0)
    pending = bridge.outbox.pending_by_tenant()
    assert pending == {"a": 1, "c": 1}, f"{pending} {time.monotonic() - started:.1f} s after the start"
    bridge.companies.get("c").activity.set(True, False)
    until(lambda: len(uploaded(crms("c"))) == 1, timeout=10, what="c's call once it is switched back on")
    until(lambda: len(uploaded(crms("a"))) == 4, timeout=15, what="a's call at its period's tick")
    assert uploaded(crms("a"))[3]["externalId"] == played["a"].a_leg
    assert uploaded(crms("c"))[0]["externalId"] == played["c"].a_leg


# -- reload without a lost or reordered card ---------------------------------------------------------------


def cards_of(crm: FakeRetailCRM, call_id: str) -> list[str]:
    return [e["type"] for e in crm.events if e["callExternalId"] == call_id]


def test_reload_with_calls_in_progress_loses_and_reorders_no_card(fleet, crms, simulator) -> None:
    """Calls ringing through a reload: a unchanged, b changed (same CRM account), c moved to another CRM
    account, d removed, e added. Every card arrives once, `in` before `hangup`, at the CRM the call
    started with; every history entry once."""
    for name in ("a", "b", "c", "d"):
        crms(name).latency = 0.3   # the `in` card is still in flight when the reload comes
    bridge = fleet(("a", "b", "c", "d"))
    moved = FakeRetailCRM(api_key="c-moved-key-0123456789", known_codes={"100", "200"}, known_user_ids={1, 2},
                          known_sites={"shop1"}).start()
    try:
        paused = {name: simulator.play("inbound_answered", None, wire(name), until="CHANNEL_BRIDGE")
                  for name in ("a", "b", "c", "d")}
        until(lambda: all(crms(n).requests for n in ("a", "b", "c", "d")), what="the `in` cards in flight")
        d = fleet.dir  # type: ignore[attr-defined]
        (d / "b.yaml").write_text(tenant_yaml("b", crms("b").url, extra="routing: {timeout: 0.5}\n"))
        (d / "c.yaml").write_text(tenant_yaml("c", moved.url, api_key="c-moved-key-0123456789"))
        (d / "d.yaml").unlink()
        (d / "e.yaml").write_text(tenant_yaml("e", crms("e").url))
        assert bridge.reload() == {}
        gevent.joinall([gevent.spawn(simulator.resume, p) for p in paused.values()], raise_error=True)
        after = {name: simulator.play("inbound_answered", None, wire(name)) for name in ("a", "b", "c", "e")}
        for name, p in paused.items():
            until(lambda p=p, name=name: len(cards_of(crms(name), p.a_leg)) >= 2, timeout=10,
                  what=f"{name}'s call in progress: its cards")
        until(lambda: len(cards_of(moved, after["c"].a_leg)) >= 2, timeout=10, what="c's new call on its new CRM")
        for name in ("a", "b", "e"):
            until(lambda name=name: len(cards_of(crms(name), after[name].a_leg)) >= 2, timeout=10,
                  what=f"{name}'s new call")
        gevent.sleep(0.5)   # anything late or doubled would arrive now
        for name, p in paused.items():
            assert cards_of(crms(name), p.a_leg) == ["in", "hangup"], name
        for name in ("a", "b", "e"):
            assert cards_of(crms(name), after[name].a_leg) == ["in", "hangup"], name
        assert cards_of(moved, after["c"].a_leg) == ["in", "hangup"]
        assert cards_of(moved, paused["c"].a_leg) == [] and cards_of(crms("c"), after["c"].a_leg) == []
        # History: once each, through the tenant's current account; the removed tenant's call is kept.
        until(lambda: bridge.outbox.pending_by_tenant() == {"d": 1}, timeout=15, what="every history but d's")
        histories = {name: [c["externalId"] for c in uploaded(crm)]
                     for name, crm in (("a", crms("a")), ("b", crms("b")), ("c", crms("c")), ("moved", moved),
                                       ("d", crms("d")), ("e", crms("e")))}
        assert sorted(histories["a"]) == sorted([paused["a"].a_leg, after["a"].a_leg])
        assert sorted(histories["b"]) == sorted([paused["b"].a_leg, after["b"].a_leg])
        assert histories["c"] == [] and sorted(histories["moved"]) == sorted([paused["c"].a_leg, after["c"].a_leg])
        assert histories["d"] == [] and histories["e"] == [after["e"].a_leg]
        # b kept its CRM client and card queue (nothing restarted); c's old one retires once its call ended.
        until(lambda: bridge.companies.get("b").cards.sent == 4, what="b's four cards through its one sender")
        until(lambda: not bridge.companies._retiring, timeout=15, what="the retired companies to stop")
        assert bridge.companies.cards_dropped_retired == 0
    finally:
        moved.stop()


def test_reload_of_a_changed_file_keeps_the_tenants_running_parts(fleet, crms) -> None:
    bridge = fleet(("a", "b"))
    before = {n: bridge.companies.get(n) for n in ("a", "b")}
    d: pathlib.Path = fleet.dir  # type: ignore[attr-defined]
    (d / "a.yaml").write_text(tenant_yaml("a", crms("a").url).replace('"200": 2', '"200": 2, "300": 1'))
    assert bridge.reload() == {}
    a = bridge.companies.get("a")
    assert a is not before["a"] and a.cfg.managers["300"] == 1
    assert (a.crm, a.cards, a.history, a.key) == (before["a"].crm, before["a"].cards, before["a"].history,
                                                  before["a"].key)
    assert a.history.builder.managers["300"] == 1   # its history entries follow the new file
    assert bridge.companies.get("b") is before["b"]
    assert not bridge.companies._retiring


def test_the_poll_turns_only_to_tenants_with_calls_waiting(fleet, crms) -> None:
    # The poll is the safety net for calls nobody woke an uploader for; with a thousand tenants, a turn
    # for each of them every poll held up everybody's cards.
    bridge = fleet(("a", "b", "c"), workers=2)
    scheduler = bridge.companies.scheduler
    until(lambda: scheduler.in_flight == 0, what="the start-up turns")
    before = scheduler.turns
    # b's calls reach the outbox without waking its uploader (as after a wake lost to a crash of its turn).
    bridge.outbox.add_many([dataclasses.replace(make_call(i, external_phone=did("b", 1)), call_id=f"b-poll-{i}",
                                                tenant="b") for i in range(3)])
    scheduler.poll_interval, scheduler._next_poll = 0.2, 0.0
    scheduler._changed.set()
    until(lambda: len(uploaded(crms("b"))) == 3, what="b's calls found by the poll")
    gevent.sleep(1.0)  # five more polls
    assert uploaded(crms("a")) == [] and uploaded(crms("c")) == []
    # b's batch, and the turn that found nothing more: not a turn per tenant per poll.
    assert scheduler.turns - before <= 3


def test_a_switched_off_tenants_waiting_calls_do_not_hold_up_a_shutdown(fleet, crms) -> None:
    # a's module is deactivated in retailCRM: its calls wait in the outbox, and there is nothing to wait for
    # at shutdown; b has nothing left. The shutdown used to wait its whole timeout on the outbox-wide count.
    bridge = fleet(("a", "b"))
    bridge.companies.get("a").activity.set(False, False)
    bridge.outbox.add_many([dataclasses.replace(make_call(i, external_phone=did("a", 1)), call_id=f"a-off-{i}",
                                                tenant="a") for i in range(3)])
    gevent.sleep(1.0)  # a's switched-off calls stay where they are meanwhile
    assert uploaded(crms("a")) == []
    started = time.monotonic()
    bridge.stop(timeout=30.0)
    assert time.monotonic() - started < 15.0
    assert uploaded(crms("a")) == []
    with Outbox(bridge.outbox.path) as outbox:
        assert outbox.pending_by_tenant() == {"a": 3}
