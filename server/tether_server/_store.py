"""The etcd key layout, and the operations and compares a transaction is built from.

Everything Tether knows lives under ``/tether/``. What WatchAgents needs sits under
``/tether/fleet/`` so that one watch sees it all::

    /tether/fleet/halts/<halt id>                    Halt (JSON), until resumed
    /tether/fleet/live/<tenant>/<agent>/<run>/<inst> session id, on its coordinator's lease
    /tether/fleet/roster/<tenant>/<agent>/<run>/<inst> AgentInstance (JSON), outlives presence
    /tether/checkpoints/<tenant>/<agent>/<run>       the run's last checkpoint (Struct JSON)
    /tether/runs/<run>                               "<tenant>/<agent>" of a run, for run kills
    /tether/ledger/<tenant>/<agent>/<run>/<chunk>    EffectBatch (JSON), append-only
    /tether/effect-keys/<tenant>/<agent>/<run>/<key> a strict effect's key: its holder's
                                                     instance id on the coordinator's lease
                                                     while in flight, then "landed"
    /tether/audit/<time ns>-<random>                 AuditEntry (JSON), append-only
    /tether/audit-head                               the hash of the newest audit entry
    /tether/keys/permit-ed25519                      the shared permit key, unless --permit-key
    /tether/coordinators/<id>                        on the coordinator's own lease
    /tether/protect/policy                           the policy in force (PolicyVersion JSON)
    /tether/protect/policy-history/<version>         every policy applied (PolicyVersion JSON)
    /tether/protect/counts/<coordinator id>          its running totals, on its lease
    /tether/protect/evaluator                        the elected evaluator, on its lease
    /tether/protect/breakers/<name>/<subject>        a breaker's state for one subject
    /tether/protect/fired/<rule>/<subject>           a rule that acted, and under which version

Keys are built and parsed only here, by the typed functions below. Talking to etcd is
``_etcd``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

from aetcd import rpc
from google.protobuf import json_format
from google.protobuf.message import Message

ROOT = b"/tether/"
FLEET = ROOT + b"fleet/"
HALTS = FLEET + b"halts/"
LIVE = FLEET + b"live/"
ROSTER = FLEET + b"roster/"
CHECKPOINTS = ROOT + b"checkpoints/"
RUNS = ROOT + b"runs/"
LEDGER = ROOT + b"ledger/"
EFFECT_KEYS = ROOT + b"effect-keys/"
AUDIT = ROOT + b"audit/"
AUDIT_HEAD = ROOT + b"audit-head"
KEYS = ROOT + b"keys/"
PERMIT_KEY = KEYS + b"permit-ed25519"
COORDINATORS = ROOT + b"coordinators/"
PROTECT = ROOT + b"protect/"
POLICY = PROTECT + b"policy"
POLICY_HISTORY = PROTECT + b"policy-history/"
COUNTS = PROTECT + b"counts/"
EVALUATOR = PROTECT + b"evaluator"
BREAKERS = PROTECT + b"breakers/"
FIRED = PROTECT + b"fired/"

M = TypeVar("M", bound=Message)
log = logging.getLogger("tether_server")


class RunKey(NamedTuple):
    """One run: what a checkpoint and a ledger belong to."""

    tenant: str
    agent: str
    run_id: str


class InstanceKey(NamedTuple):
    """Who an instance is; also the tail of its presence and roster keys."""

    tenant: str
    agent: str
    run_id: str
    instance_id: str

    @property
    def run(self) -> RunKey:
        return RunKey(self.tenant, self.agent, self.run_id)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.tenant, self.agent, self.run_id, self.instance_id)


# -- keys: built and parsed here only -----------------------------------------------------


def _join(prefix: bytes, *parts: str) -> bytes:
    return prefix + "/".join(parts).encode()


def live_key(key: InstanceKey) -> bytes:
    """The instance's presence: exists while a coordinator serves its stream."""
    return _join(LIVE, *key.parts)


def roster_key(key: InstanceKey) -> bytes:
    """The instance's record, which outlives its presence."""
    return _join(ROSTER, *key.parts)


def roster_prefix(tenant: str, agent: str = "") -> bytes:
    """Every roster key of a tenant, or of one agent of it."""
    return _join(ROSTER, *(p for p in (tenant, agent) if p), "")


def instance_of(raw: bytes) -> InstanceKey | None:
    """The instance a presence or roster key names; None for any other key."""
    for prefix in (LIVE, ROSTER):
        if raw.startswith(prefix):
            parts = raw[len(prefix) :].decode().split("/")
            return InstanceKey(*parts) if len(parts) == 4 else None
    return None


def checkpoint_key(run: RunKey) -> bytes:
    return _join(CHECKPOINTS, *run)


def checkpoint_prefix(tenant: str = "") -> bytes:
    """Every checkpoint, or every checkpoint of one tenant."""
    return _join(CHECKPOINTS, tenant, "") if tenant else CHECKPOINTS


def run_of_checkpoint(raw: bytes) -> RunKey | None:
    """The run a checkpoint key belongs to; None for any other key."""
    if not raw.startswith(CHECKPOINTS):
        return None
    parts = raw[len(CHECKPOINTS) :].decode().split("/")
    return RunKey(*parts) if len(parts) == 3 else None


def run_owner_key(run_id: str) -> bytes:
    """``<tenant>/<agent>`` of a run, so that a run kill can be checked by run id alone."""
    return _join(RUNS, run_id)


def run_owner(run: RunKey) -> bytes:
    """The value under ``run_owner_key``: who the run belongs to."""
    return f"{run.tenant}/{run.agent}".encode()


def owner_of(value: bytes) -> tuple[str, str]:
    """The ``(tenant, agent)`` a ``run_owner`` value names."""
    tenant, _, agent = value.decode().partition("/")
    return tenant, agent


def halt_key(halt_id: str) -> bytes:
    return HALTS + halt_id.encode()


def halt_id_of(raw: bytes) -> str:
    """The halt id a halt key names."""
    return raw[len(HALTS) :].decode()


def ledger_prefix(tenant: str, agent: str = "", run_id: str = "") -> bytes:
    """Every ledger chunk of a tenant, an agent of it, or one run of that agent."""
    return _join(LEDGER, *(p for p in (tenant, agent, run_id) if p), "")


def ledger_chunk_key(run: RunKey, name: str) -> bytes:
    return ledger_prefix(*run) + name.encode()


def effect_key(run: RunKey, key: str) -> bytes:
    """The claim on an idempotency key of a run; the run's names hold no "/", the key may."""
    return _join(EFFECT_KEYS, *run, key)


def audit_key(entry_id: str) -> bytes:
    return AUDIT + entry_id.encode()


def coordinator_key(coordinator_id: str) -> bytes:
    return _join(COORDINATORS, coordinator_id)


def policy_version_key(version: int) -> bytes:
    return POLICY_HISTORY + f"{version:012d}".encode()


def counts_key(coordinator_id: str) -> bytes:
    return _join(COUNTS, coordinator_id)


def counts_source(raw: bytes) -> str:
    """The coordinator whose counts a ``counts_key`` holds."""
    return raw[len(COUNTS) :].decode()


def breaker_key(name: str, subject: tuple[str, ...]) -> bytes:
    """A breaker's state for a subject: ``tenant``, ``tenant/agent`` or ``tenant/agent/run``."""
    return _join(BREAKERS, name, *subject)


def breaker_of(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """The breaker name and the subject a ``breaker_key`` names."""
    name, _, subject = raw[len(BREAKERS) :].decode().partition("/")
    return name, tuple(subject.split("/"))


def fired_key(rule: str, subject: tuple[str, ...]) -> bytes:
    return _join(FIRED, rule, *subject)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover every key starting with prefix."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def to_json(msg: Message) -> bytes:
    return json_format.MessageToJson(msg, indent=None, sort_keys=True).encode()


def from_json(data: bytes, msg: M) -> M:
    json_format.Parse(data, msg, ignore_unknown_fields=True)
    return msg


def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, *, prev_kv: bool = False) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, prev_kv=prev_kv))


def range_op(key: bytes, *, prefix: bool = False) -> Any:
    end = prefix_end(key) if prefix else b""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end))


def txn_op(compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]) -> Any:
    """A transaction nested in another (a second chance, in the same round trip)."""
    request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
    return rpc.RequestOp(request_txn=request)


def absent(key: bytes) -> Any:
    """A compare that holds when ``key`` does not exist."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0
    )


def present(key: bytes) -> Any:
    return rpc.Compare(
        key=key, result=rpc.Compare.GREATER, target=rpc.Compare.CREATE, create_revision=0
    )


def unchanged_since(key: bytes, revision: int) -> Any:
    """A compare that holds while ``key`` was last written at ``revision``."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision
    )


def holds(key: bytes, value: bytes) -> Any:
    """A compare that holds when ``key`` has ``value``."""
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=value)
