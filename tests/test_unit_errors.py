"""The coordinator's one status table: every error it answers with maps, subclasses included."""

from __future__ import annotations

import grpc
import pytest
import tether
from tether_server._errors import (
    ANSWERABLE,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    check_name,
    parse_agent_uri,
    status_of,
)
from tether_server._etcd import EtcdUnavailable
from tether_server._watch import WatchBroken

Code = grpc.StatusCode


class _NarrowerArgument(InvalidArgument):
    """A subclass nobody put in the table: it must map like its parent, not raise KeyError."""


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (InvalidArgument("x"), Code.INVALID_ARGUMENT),
        (_NarrowerArgument("x"), Code.INVALID_ARGUMENT),
        (FailedPrecondition("x"), Code.FAILED_PRECONDITION),
        (NotFound("x"), Code.NOT_FOUND),
        (Unauthenticated("x"), Code.UNAUTHENTICATED),
        (PermissionDenied("x"), Code.PERMISSION_DENIED),
        (EtcdUnavailable("x"), Code.UNAVAILABLE),
        (WatchBroken("x"), Code.UNAVAILABLE),
    ],
)
def test_answerable_errors_map_to_their_status(err: Exception, code: grpc.StatusCode) -> None:
    assert isinstance(err, ANSWERABLE)
    assert status_of(err) == code


def test_the_sdks_name_rules_raise_the_servers_own_error_with_the_sdks_message() -> None:
    with pytest.raises(tether.InvalidArgument) as sdk:
        tether.parse_agent_uri("tenant/agent")
    with pytest.raises(InvalidArgument) as ours:
        parse_agent_uri("tenant/agent")
    assert str(ours.value) == str(sdk.value)
    with pytest.raises(InvalidArgument, match="run_id"):
        check_name("run_id", "a b")
    assert check_name("run_id", "r-1") == "r-1"
    assert not isinstance(tether.InvalidArgument("x"), ANSWERABLE)  # one root: the server's


def test_the_servers_permission_denied_is_not_the_sdks() -> None:
    assert not issubclass(PermissionDenied, tether.PermissionDenied)


def test_anything_else_is_a_bug_and_goes_out_as_internal() -> None:
    assert not isinstance(KeyError("x"), ANSWERABLE)
    assert status_of(KeyError("x")) == Code.INTERNAL
