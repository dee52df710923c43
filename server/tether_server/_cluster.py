"""An N-member etcd cluster on loopback, for the chaos tests and the bench: start it, find
its leader, kill members and bring them back on the same ports and data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self, cast

import grpc
from aetcd import rpc

from tether_server._launch import EtcdProcess, wait_until


class EtcdCluster:
    """``size`` etcd members that know each other from ``--initial-cluster``.

    Args:
        data_dir: each member keeps its data in ``data_dir/<name>``.
        size: how many members.
        log_dir: where each member's output goes (``<name>.log``); default: nowhere.
        extra: further flags for every member, such as ``--election-timeout``.
    """

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        *,
        log_dir: Path | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        names = [f"m{i}" for i in range(size)]
        members = [
            EtcdProcess(
                data_dir / name, name, log=None if log_dir is None else log_dir / f"{name}.log"
            )
            for name in names
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for member in members:
            member.initial_cluster = initial
            member.extra = ("--initial-cluster-state=new", *extra)
        self.members = members

    def __iter__(self) -> Iterator[EtcdProcess]:
        return iter(self.members)

    @property
    def urls(self) -> str:
        """``http://HOST:PORT,...`` of every member, as ``tether serve --etcd`` takes it."""
        return ",".join(m.url for m in self.members)

    def start(self, timeout: float = 30.0) -> Self:
        """Start every member and wait until each answers.

        Raises:
            LaunchError: a member exited or did not answer in time.
        """
        self.restart(*self.members, timeout=timeout)
        return self

    def restart(self, *members: EtcdProcess, timeout: float = 30.0) -> None:
        """Start ``members`` again (same ports and data), then wait until each answers.

        All are spawned before any is awaited: a member answers clients only once it has
        joined a quorum, which may need the others.
        """
        for member in members:
            member.spawn()
        for member in members:
            member.await_ready(timeout)

    def running(self) -> list[EtcdProcess]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    def leader(self, timeout: float = 15.0) -> EtcdProcess:
        """The member that leads now, once a running member names one.

        Raises:
            LaunchError: no running member named a leader in time.
        """
        # wait_until returns only a truthy result: never None
        return cast(EtcdProcess, wait_until(self._find_leader, timeout, "an etcd leader"))

    def _find_leader(self) -> EtcdProcess | None:
        for member in self.running():
            with grpc.insecure_channel(member.endpoint) as channel:
                status = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=1)
            if status.leader and status.leader == status.header.member_id:
                return member
        return None

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL if it lingers)."""
        for member in self.members:
            member.stop()
