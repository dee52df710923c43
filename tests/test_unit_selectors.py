"""Halt selectors as pure functions: validation, halt ids, matching, and what counts as a stop."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from tether.v1 import types_pb2
from tether_server._errors import ANSWERABLE, status_of
from tether_server._selectors import halt_id, is_stop, matches, scope_name, validate
from tether_server._store import InstanceKey

GLOBAL, TENANT, AGENT, RUN = (
    types_pb2.SCOPE_GLOBAL,
    types_pb2.SCOPE_TENANT,
    types_pb2.SCOPE_AGENT,
    types_pb2.SCOPE_RUN,
)


def sel(scope: int = 0, **fields: Any) -> types_pb2.Selector:
    return types_pb2.Selector(scope=scope, **fields)  # type: ignore[arg-type]


def refused(selector: types_pb2.Selector) -> str:
    """The message validate() refuses ``selector`` with, checked to be INVALID_ARGUMENT."""
    with pytest.raises(ANSWERABLE) as caught:
        validate(selector)
    assert status_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    return str(caught.value)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector",
    [
        sel(GLOBAL),
        sel(TENANT, tenant="acme"),
        sel(AGENT, tenant="acme", agent="email"),
        sel(RUN, run_id="campaign-42"),
        sel(RUN, tenant="acme", run_id="campaign-42"),
        sel(RUN, tenant="acme", agent="email", run_id="campaign-42"),
        sel(TENANT, tenant="acme", capability="send_email", labels={"feature": "beta"}),
    ],
)
def test_well_formed_selectors_pass_unchanged(selector: types_pb2.Selector) -> None:
    assert validate(selector) is selector


def test_an_empty_scope_is_refused_never_read_as_global() -> None:
    assert refused(sel()) == "selector.scope is required: one of global, tenant, agent, run"
    assert refused(sel(tenant="acme")).startswith("selector.scope is required")


def test_an_unknown_scope_is_refused() -> None:
    assert refused(sel(42)).startswith("selector.scope 42 is unknown")


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        (sel(TENANT), "a tenant halt needs selector.tenant"),
        (sel(AGENT, tenant="acme"), "a agent halt needs selector.agent"),
        (sel(AGENT, agent="email"), "a agent halt needs selector.tenant"),
        (sel(RUN, tenant="acme"), "a run halt needs selector.run_id"),
    ],
)
def test_each_scope_requires_its_fields(selector: types_pb2.Selector, message: str) -> None:
    assert refused(selector) == message


@pytest.mark.parametrize(
    ("selector", "field"),
    [
        (sel(GLOBAL, tenant="acme"), "tenant"),
        (sel(GLOBAL, run_id="r"), "run_id"),
        (sel(TENANT, tenant="acme", agent="email"), "agent"),
        (sel(TENANT, tenant="acme", run_id="r"), "run_id"),
        (sel(AGENT, tenant="acme", agent="email", run_id="r"), "run_id"),
    ],
)
def test_each_scope_forbids_what_would_narrow_it(selector: types_pb2.Selector, field: str) -> None:
    scope = scope_name(selector.scope)
    assert refused(selector) == (
        f"a {scope} halt takes no selector.{field}; drop it or narrow the scope"
    )


def test_a_run_halt_with_an_agent_needs_its_tenant() -> None:
    message = refused(sel(RUN, agent="email", run_id="r"))
    assert message == "selector.agent needs selector.tenant as well"


@pytest.mark.parametrize(
    ("selector", "what"),
    [
        (sel(TENANT, tenant="ac/me"), "tenant 'ac/me'"),
        (sel(AGENT, tenant="acme", agent="-email"), "agent '-email'"),
        (sel(RUN, run_id="x" * 129), "run_id 'xxx"),
        (sel(TENANT, tenant="acme", capability="send email"), "selector.capability 'send email'"),
        (sel(TENANT, tenant="acme", labels={"fea ture": "beta"}), "label key 'fea ture'"),
        (sel(TENANT, tenant="acme", labels={"feature": "be/ta"}), "label feature 'be/ta'"),
    ],
)
def test_bad_names_are_refused_with_the_field_named(
    selector: types_pb2.Selector, what: str
) -> None:
    message = refused(selector)
    assert message.startswith(what)
    assert "is not a valid name" in message


# -- halt ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (sel(GLOBAL), "global"),
        (sel(TENANT, tenant="acme"), "tenant/acme"),
        (sel(AGENT, tenant="acme", agent="email"), "agent/acme/email"),
        (sel(RUN, run_id="campaign-42"), "run/*/*/campaign-42"),
        (sel(RUN, tenant="acme", run_id="c"), "run/acme/*/c"),
        (sel(RUN, tenant="acme", agent="email", run_id="c"), "run/acme/email/c"),
        (sel(TENANT, tenant="acme", capability="send_email"), "tenant/acme#send_email"),
        (sel(TENANT, tenant="acme", labels={"feature": "beta"}), "tenant/acme+feature=beta"),
        (
            sel(GLOBAL, capability="pay", labels={"zone": "eu", "feature": "beta"}),
            "global#pay+feature=beta+zone=eu",
        ),
    ],
)
def test_halt_ids_name_the_selector(selector: types_pb2.Selector, expected: str) -> None:
    assert halt_id(selector) == expected


def test_halt_ids_are_stable_whatever_order_labels_come_in() -> None:
    one = sel(TENANT, tenant="acme", labels={"a": "1", "b": "2", "c": "3"})
    other = sel(TENANT, tenant="acme", labels={"c": "3", "a": "1", "b": "2"})
    assert halt_id(one) == halt_id(other) == "tenant/acme+a=1+b=2+c=3"
    assert halt_id(one) == halt_id(one)


def test_a_capability_and_a_label_never_share_an_id() -> None:
    freeze = sel(TENANT, tenant="acme", capability="beta")
    labelled = sel(TENANT, tenant="acme", labels={"beta": "beta"})
    assert halt_id(freeze) != halt_id(labelled)


# -- matching -----------------------------------------------------------------------------

KEY = InstanceKey("acme", "email", "campaign-42", "i-1")


@pytest.mark.parametrize(
    ("selector", "hit"),
    [
        (sel(GLOBAL), True),
        (sel(TENANT, tenant="acme"), True),
        (sel(TENANT, tenant="other"), False),
        (sel(AGENT, tenant="acme", agent="email"), True),
        (sel(AGENT, tenant="acme", agent="billing"), False),
        (sel(RUN, run_id="campaign-42"), True),
        (sel(RUN, run_id="campaign-43"), False),
        (sel(RUN, tenant="other", run_id="campaign-42"), False),
        (sel(RUN, tenant="acme", agent="billing", run_id="campaign-42"), False),
    ],
)
def test_matching_by_identity(selector: types_pb2.Selector, hit: bool) -> None:
    assert matches(selector, KEY) is hit


def test_matching_by_labels_needs_every_label() -> None:
    labels = {"feature": "beta", "zone": "eu"}
    assert matches(sel(TENANT, tenant="acme", labels={"feature": "beta"}), KEY, labels)
    assert matches(sel(GLOBAL, labels={"feature": "beta", "zone": "eu"}), KEY, labels)
    assert not matches(sel(GLOBAL, labels={"feature": "beta", "zone": "us"}), KEY, labels)
    assert not matches(sel(GLOBAL, labels={"feature": "beta"}), KEY)  # no labels at all
    assert not matches(sel(TENANT, tenant="other", labels={"feature": "beta"}), KEY, labels)


def test_a_capability_does_not_narrow_who_matches() -> None:
    assert matches(sel(TENANT, tenant="acme", capability="send_email"), KEY)


# -- stops and freezes --------------------------------------------------------------------


def test_a_halt_is_a_stop_unless_it_freezes_one_capability() -> None:
    assert is_stop(types_pb2.Halt(selector=sel(GLOBAL)))
    assert is_stop(types_pb2.Halt(selector=sel(TENANT, tenant="acme", labels={"f": "b"})))
    assert not is_stop(types_pb2.Halt(selector=sel(TENANT, tenant="acme", capability="pay")))
