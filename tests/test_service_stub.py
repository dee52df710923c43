"""``tether._channel.ServiceStub``: the methods of a generated service, made when first used."""

from __future__ import annotations

import grpc
import pytest
from tether._channel import ServiceStub
from tether.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Coordinator

ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


def test_a_method_calls_the_coordinator_as_the_generated_stub_does(coord: Coordinator) -> None:
    with grpc.insecure_channel(coord.addr) as channel:
        ours = ServiceStub(channel, ADMIN).WhoAmI(admin_pb2.WhoAmIRequest(), timeout=10)
        theirs = admin_pb2_grpc.AdminServiceStub(channel).WhoAmI(
            admin_pb2.WhoAmIRequest(), timeout=10
        )
    assert isinstance(ours, admin_pb2.Principal)
    assert ours == theirs


def test_every_method_of_the_generated_stub_is_there() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:  # never dialled
        generated = vars(admin_pb2_grpc.AdminServiceStub(channel))
        stub = ServiceStub(channel, ADMIN)
        assert sorted(generated) == sorted(m.name for m in ADMIN.methods)
        for name, method in generated.items():
            assert type(getattr(stub, name)) is type(method), name


def test_a_method_the_service_lacks_is_an_attribute_error() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(AttributeError):
        ServiceStub(channel, ADMIN).Kil  # noqa: B018
