"""Ingest benchmark: captured FreeSWITCH event streams through fsbridge's framer, parser
and call model, next to stock greenswitch's parser on the same bytes, in one run.

    python bench/bench_ingest.py [--calls 2000]

Both sides read from memory (no socket), so the figures compare parsing and
bookkeeping, not the kernel. Every replayed call gets fresh uuids (same length, so the
captured Content-Length headers stay right).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import re
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from greenswitch.esl import ESLEvent  # noqa: E402

from fsbridge.calls.legs import Directory  # noqa: E402
from fsbridge.calls.tracker import CallTracker  # noqa: E402
from fsbridge.esl.protocol import FrameReader, parse_event  # noqa: E402

ESL = ROOT / "tests" / "fixtures" / "esl"
# Every captured call: the lab's simple flows and the contact-center flows (queues, pickup, transfers,
# voicemail, forwarding, loopback legs, hold, parking); not the `show channels` transcripts.
SCENARIOS = tuple(sorted(p.name.split(".")[0] for p in ESL.glob("*.plain.raw") if not p.name.startswith("show_")))
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def event_frames(raw: bytes) -> bytes:
    """Only the event frames of a capture (drop auth and command replies)."""
    out = bytearray()
    for frame in FrameReader().feed(raw):
        if frame.content_type.startswith("text/event-"):
            out += b"Content-Length: %d\nContent-Type: %s\n\n" % (len(frame.body), frame.content_type.encode())
            out += frame.body
    return bytes(out)


def stream(fmt: str, calls: int) -> tuple[bytes, int]:
    templates = [event_frames((ESL / f"{name}.{fmt}.raw").read_bytes()) for name in SCENARIOS]
    core = {m for t in templates for m in re.findall(rb"Core-UUID(?:: |\":\")([0-9a-f-]{36})", t)}
    parts = []
    for i in range(calls):
        t = templates[i % len(templates)]
        fresh: dict[bytes, bytes] = {}

        def sub(m: re.Match[bytes], fresh: dict[bytes, bytes] = fresh) -> bytes:
            old = m.group(0)
            if old in core:
                return old
            return fresh.setdefault(old, str(uuid.uuid4()).encode())
        parts.append(UUID.sub(sub, t))
    data = b"".join(parts)
    return data, data.count(b"Content-Type: text/event-")


def run_fsbridge(data: bytes, model: bool = True) -> float:
    directory = Directory(managers=frozenset({"100", "200"}), external_phones={"74999999999": "shop1"})
    sink: list = []
    tracker = CallTracker(directory, sink.append, sink.append)
    reader = FrameReader()
    start = time.perf_counter()
    for i in range(0, len(data), 262144):  # the reader's recv size
        for frame in reader.feed(data[i:i + 262144]):
            event = parse_event(frame)
            if model:
                tracker.handle(event)
    return time.perf_counter() - start


def run_greenswitch(data: bytes) -> float:
    """greenswitch 0.0.19's receive_events/handle_event path, minus the socket."""
    f = io.BytesIO(data)
    start = time.perf_counter()
    buf = ""
    while True:
        line = f.readline()
        if not line:
            break
        line = line.decode("utf-8")
        if line == "\n":
            event = ESLEvent(buf)
            buf = ""
            length = int(event.headers["Content-Length"])
            event.parse_data(f.read(length).decode("utf-8"))
            continue
        buf += line
    return time.perf_counter() - start


def best(fn, *args, repeat: int = 3) -> float:
    return min(fn(*args) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1200)
    args = parser.parse_args()
    plain, n_plain = stream("plain", args.calls)
    js, n_json = stream("json", args.calls)
    print(f"{args.calls} calls: {n_plain} plain events ({len(plain) / 1e6:.1f} MB), "
          f"{n_json} json events ({len(js) / 1e6:.1f} MB)")
    base = n_plain / best(run_greenswitch, plain)
    rows = [
        ("greenswitch 0.0.19 parser, plain (baseline)", base),
        # fsbridge decodes headers lazily, so its parser is only measured together with the
        # call model that reads them: a parser-only figure would flatter it.
        ("fsbridge framing + parsing + call model, plain", n_plain / best(run_fsbridge, plain, True)),
        ("fsbridge framing + parsing + call model, json (what it subscribes to)",
         n_json / best(run_fsbridge, js, True)),
    ]
    for label, rate in rows:
        print(f"  {label:66s} {rate:10,.0f} events/s  {rate / base:5.2f}x")
    for label, rate in rows[1:]:
        ratio = rate / base
        print(f"goal >= 3x stock greenswitch, {label.rsplit(', ', 1)[-1]}: {ratio:.2f}x "
              f"{'met' if ratio >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
