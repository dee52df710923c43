"""Every client fails over: calls and streams try each coordinator of a list in turn.

``AdminClient`` (and so the CLI, ``HaltCache`` and the drill) holds one ``Coordinators``:
a channel per address, opened when first needed. An address not known to answer is first
asked for its health, with ``connect_timeout`` as the deadline, so that a dead or hung
coordinator costs a short deadline, not the call's own. A coordinator that misses that
deadline on a live connection is busy, not gone (a loop taking in a fleet's acknowledgements
answers late): it is asked again, with the call's own deadline, once no other address has
answered, so that a Kill is never given up on a coordinator that would have taken it. A call
that fails with
UNAVAILABLE or DEADLINE_EXCEEDED moves on to the next address; a refusal (INVALID_ARGUMENT,
FAILED_PRECONDITION, PERMISSION_DENIED, ...) is the answer and is never retried. The address
that answered last is tried first next time. When none answers, ``NoCoordinator`` says in
one line which addresses failed and why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import grpc

from tether._errors import Unavailable, rpc_status

S = TypeVar("S")
T = TypeVar("T")
M = TypeVar("M")

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
"""The codes that say "this coordinator could not answer", so another one may."""

# Asked of an address not known to answer (raw bytes: an empty HealthCheckRequest), so a
# dead or hung coordinator costs the connect timeout, not the call's own.
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# What gRPC's messages say, and the few words the one-line error uses for it.
_CAUSES = (
    ("connection refused", "connection refused"),
    ("domain name not found", "address not found"),
    ("errors resolving", "address not found"),
    ("handshake", "TLS handshake failed"),
    ("certificate", "TLS handshake failed"),
    ("ssl", "TLS handshake failed"),
    ("connection reset", "connection reset"),
    ("socket closed", "connection closed"),
    ("failed parsing http/2", "not a gRPC server"),
)
# What to check, after each cause, in the one-line error a person reads.
_HINTS = {
    "connection refused": "is `tether serve` running there, on that port?",
    "address not found": "check the host name in --addr or TETHER_ADDR",
    "TLS handshake failed": "check --tls-ca (TETHER_TLS_CA), --tls-cert and --tls-key, "
    "and that the coordinator serves TLS",
    "connection reset": "a plaintext client to a TLS coordinator? give --tls-ca",
    "connection closed": "a plaintext client to a TLS coordinator? give --tls-ca",
    "not a gRPC server": "is that the coordinator's port (`tether serve --listen`)?",
}
_MISSED = object()  # a coordinator that could not answer a call, as opposed to its answer
_DEADLINE_HINT = "is it reachable from here (a firewall?), and serving (its etcd up)?"


def hint(cause: str) -> str:
    """What a person should check, given a cause from ``why``."""
    if cause.startswith("deadline exceeded"):
        return _DEADLINE_HINT
    return _HINTS.get(cause, "is a tether coordinator listening there?")


class NoCoordinator(Unavailable):
    """No coordinator of the list answered.

    Attributes:
        failures: ``(address, why)`` for each address tried, in the order tried.
    """

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = tuple(failures)
        tried = ", ".join(f"{addr} ({why}: {hint(why)})" for addr, why in self.failures)
        super().__init__(f"no coordinator answered: {tried}")


def why(err: grpc.RpcError, timeout: float | None) -> str:
    """A few words on why a coordinator did not answer, from a retried error."""
    code, details = rpc_status(err)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"deadline exceeded after {timeout:g}s" if timeout else "deadline exceeded"
    details = details or "unavailable"
    lowered = details.lower()
    for found, said in _CAUSES:
        if found in lowered:
            return said
    return " ".join(details.split())


def retried(err: grpc.RpcError) -> bool:
    """Whether another coordinator may answer where this one failed with ``err``."""
    return isinstance(err, grpc.Call) and err.code() in RETRIED


class Coordinators(Generic[S]):
    """A stub per coordinator address, the one that answered last tried first.

    Args:
        targets: ``HOST:PORT`` of each coordinator, in the order to try them.
        open_channel: Opens a channel to one address.
        stub: Makes a stub from a channel, e.g. ``AdminServiceStub``.
        connect_timeout: Seconds each address gets to connect before the next is tried.
    """

    def __init__(
        self,
        targets: Sequence[str],
        open_channel: Callable[[str], grpc.Channel],
        stub: Callable[[grpc.Channel], S],
        connect_timeout: float = 2.0,
    ) -> None:
        self.targets = tuple(targets)
        self._open = open_channel
        self._stub = stub
        self._connect_timeout = connect_timeout
        self._channels: dict[str, tuple[grpc.Channel, S]] = {}
        self._answered: set[str] = set()  # answered since their channel opened or last failed
        self._first = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        """The address tried first: the one that answered last."""
        return self.targets[self._first]

    def close(self) -> None:
        with self._lock:
            channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            channel.close()

    def call(self, invoke: Callable[[S], T], timeout: float | None = None) -> T:
        """``invoke(stub)`` on each coordinator in turn until one answers; then, if none did,
        on each that was connected but slow to answer its health check.

        Raises:
            grpc.RpcError: a coordinator refused (an error that is not retried).
            NoCoordinator: none answered.
        """
        failures: list[tuple[str, str]] = []
        busy: list[tuple[str, S]] = []
        for target in self._order():
            stub = self._connected(target, failures, busy)
            if stub is None:
                continue
            answer = self._invoke(target, stub, invoke, timeout, failures)
            if answer is not _MISSED:
                return cast(T, answer)
        for target, stub in busy:  # connected, but late to answer its health check
            answer = self._invoke(target, stub, invoke, timeout, failures)
            if answer is not _MISSED:
                self._answered.add(target)  # not checked again until it fails
                return cast(T, answer)
        raise NoCoordinator(failures)

    def _invoke(
        self,
        target: str,
        stub: S,
        invoke: Callable[[S], Any],
        timeout: float | None,
        failures: list[tuple[str, str]],
    ) -> Any:
        """``target``'s answer, or ``_MISSED`` (noted in ``failures``) if it could not answer."""
        try:
            answer = invoke(stub)
        except grpc.RpcError as err:
            if not retried(err):
                raise
            failures.append((target, why(err, timeout)))
            self._answered.discard(target)
            return _MISSED
        self._prefer(target)
        return answer

    def stream(self, open_stream: Callable[[S], Iterator[M]]) -> Iterator[tuple[int, M]]:
        """The messages of a server stream, reopened on the next coordinator when one breaks.

        Each message comes with the number of the connection it arrived on, so the caller
        knows when a stream was reopened (and its snapshot, if any, starts again).

        Raises:
            grpc.RpcError: a coordinator refused, or the stream was cancelled.
            NoCoordinator: every coordinator failed, one after the other.
        """
        failures: list[tuple[str, str]] = []
        connection = 0
        while len(failures) < len(self.targets):
            target = self.current
            stub = self._connected(target, failures)
            if stub is None:
                self._skip(target)
                continue
            connection += 1
            try:
                for message in open_stream(stub):
                    failures.clear()  # it answered: the next break starts a new round
                    yield connection, message
                return
            except grpc.RpcError as err:
                if not retried(err):
                    raise
                failures.append((target, why(err, None)))
                self._answered.discard(target)
                self._skip(target)
        raise NoCoordinator(failures)

    def _order(self) -> list[str]:
        first = self._first
        return [*self.targets[first:], *self.targets[:first]]

    def _prefer(self, target: str) -> None:
        self._first = self.targets.index(target)

    def _skip(self, target: str) -> None:
        with self._lock:
            if self.current == target:
                self._first = (self._first + 1) % len(self.targets)

    def _connected(
        self, target: str, failures: list[tuple[str, str]], busy: list[tuple[str, S]] | None = None
    ) -> S | None:
        """The stub of ``target`` if it answers a health check within the connect timeout;
        None, with the reason noted in ``failures``, if it does not. A target whose
        connection is up but whose answer is late goes to ``busy`` instead, when given.

        An address that answered since its last failure is not checked again. Any answer,
        even a refusal, shows the coordinator is there.
        """
        channel, stub = self._channel(target)
        if target in self._answered:
            return stub
        try:
            check = channel.unary_unary(
                _HEALTH_CHECK, request_serializer=bytes, response_deserializer=bytes
            )
            check(b"", timeout=self._connect_timeout)
        except grpc.RpcError as err:
            if not retried(err):
                pass
            elif busy is not None and _late(err) and _ready(channel):
                busy.append((target, stub))
                return None
            else:
                failures.append((target, why(err, self._connect_timeout)))
                return None
        self._answered.add(target)
        return stub

    def _channel(self, target: str) -> tuple[grpc.Channel, S]:
        with self._lock:
            found = self._channels.get(target)
            if found is None:
                channel = self._open(target)
                found = self._channels[target] = (channel, self._stub(channel))
            return found


def _late(err: grpc.RpcError) -> bool:
    return isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _ready(channel: grpc.Channel) -> bool:
    """Whether ``channel`` is connected (HTTP/2 up, TLS done), as far as gRPC knows now."""
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=0.05)
    except grpc.FutureTimeoutError:
        return False
    finally:
        ready.cancel()
    return True


class FailoverStub:
    """A stub whose unary methods run on the first coordinator that answers.

    ``FailoverStub(coordinators).Kill(request, timeout=..., metadata=...)`` is
    ``stub.Kill(...)`` tried on each coordinator in turn, as ``Coordinators.call`` does.
    """

    def __init__(self, coordinators: Coordinators[Any]) -> None:
        self._coordinators = coordinators

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def unary(request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
            return self._coordinators.call(
                lambda stub: getattr(stub, name)(request, timeout=timeout, **kwargs), timeout
            )

        return unary
