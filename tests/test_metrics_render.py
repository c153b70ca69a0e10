"""/metrics with many tenants: the text is what prometheus_client renders, produced in slices so that a
scrape does not hold up events and cards (1 000 tenants' card outcomes held the hub 81 ms in one piece)."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from fsbridge import metrics


def test_a_large_family_renders_in_slices_and_reads_as_one(monkeypatch) -> None:
    m = metrics.Metrics()
    tenants = [f"t{i:04d}" for i in range(1000)]
    m.watch("fsbridge_tenant_call_events_total", "Call events by tenant and outcome",
            lambda: [({"tenant": t, "outcome": o}, float(i)) for i, t in enumerate(tenants)
                     for o in ("sent", "stale", "queue_full", "rejected")], counter=True)
    m.watch("fsbridge_empty", "A family with nothing in it", lambda: [])
    m.on_crm_request("POST", "/api/v5/telephony/call/event", 200, 0.01)
    turns = []
    monkeypatch.setattr(metrics, "give_way", lambda: turns.append(1))
    text = m.render()
    # Byte for byte what prometheus_client writes in one go (one HELP/TYPE per family, every sample once),
    # except the process and garbage-collector families, which change from one read to the next.
    def steady(body: bytes) -> list[bytes]:
        return [line for line in body.splitlines() if not line.startswith((b"process_", b"python_gc", b"# "))
                or b"fsbridge" in line]
    assert steady(text) == steady(generate_latest(m.registry))
    assert text.count(b"# TYPE fsbridge_tenant_call_events_total counter") == 1
    assert text.count(b'fsbridge_tenant_call_events_total{outcome="rejected",tenant="t0999"} 999.0') == 1
    # The other greenlets had a turn at least every RENDER_CHUNK samples of the big family.
    assert len(turns) >= 4000 // metrics.RENDER_CHUNK
