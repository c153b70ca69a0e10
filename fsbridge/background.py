"""Background work (history batches, purges, /metrics) gives way to the calls.

Everything shares one gevent hub. `gevent.sleep(0)` hands over only to greenlets that are already
runnable, and gevent keeps running those for up to the switch interval before it polls sockets again: a
history batch yielding that way still kept an event unread, or a card's reply unseen, for milliseconds.
`give_way()` waits until the loop has nothing else pending (no readable socket, no due timer, no ready
greenlet), so a card waits behind a history upload's next small step at most, not behind the batch. The
bound (10 ms) keeps a saturated hub from starving the history: a 50-call batch gives way ~65 times, so
even then four upload workers move ~300 calls/s.
"""

from __future__ import annotations

import gevent

MAX_WAIT = 0.01


def give_way(max_wait: float = MAX_WAIT) -> None:
    """Let everything else that is ready run first; return within `max_wait` seconds even if it never ends."""
    with gevent.Timeout(max_wait, False):
        gevent.idle()
