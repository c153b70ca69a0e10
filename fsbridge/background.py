"""Background work (history batches, purges, /metrics) gives way to the calls.

Everything shares one gevent hub. `gevent.sleep(0)` hands over only to greenlets that are already
runnable, and gevent keeps running those for up to the switch interval before it polls sockets again: a
history batch yielding that way still kept an event unread, or a card's reply unseen, for milliseconds.
`give_way()` waits until the loop has nothing else pending (no readable socket, no due timer, no ready
greenlet), so a card never waits behind a history upload; the bound keeps a busy PBX from starving the
history altogether.
"""

from __future__ import annotations

import gevent

MAX_WAIT = 0.05


def give_way(max_wait: float = MAX_WAIT) -> None:
    """Let everything else that is ready run first; return within `max_wait` seconds even if it never ends."""
    with gevent.Timeout(max_wait, False):
        gevent.idle()
