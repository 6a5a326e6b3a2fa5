"""The retry policy shared by the clients' sending paths (lanes, direct calls, bulk calls).

A module of its own, used by the client core (``_core``) and imported by nothing it imports.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shardstate._errors import Unavailable
from shardstate.cluster.bootstrap import find_router

if TYPE_CHECKING:
    from shardstate._link import ClusterLink


class Backoff:
    """Retries of a call whose shard died mid-call (it restarts from storage): bounded, with backoff.

    Writes carry an op_id (the caller's or an automatic one), so a retry of a write that did commit
    before the crash returns the first result instead of applying it twice.
    """

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.deadline = time.monotonic() + link.retry_timeout
        self.delay = 0.02

    def next_delay(self, exc: BaseException) -> float:
        """Seconds to wait before the next try; raises :class:`Unavailable` when it is no use."""
        link = self.link
        link.check_open()
        if time.monotonic() + self.delay > self.deadline:
            raise Unavailable(
                f"a shard of state cluster {link.cluster!r} did not come back within "
                f"{link.retry_timeout}s: {exc}"
            ) from exc
        if find_router(link.cluster) is None:
            link.closed = True
            raise Unavailable(f"state cluster {link.cluster!r} is not running (shut down?)") from exc
        delay, self.delay = self.delay, min(self.delay * 2, 1.0)
        return delay
