"""Tether: a kill switch for fleets of AI agents.

Inside an agent::

    with tether.Agent("agent://acme/email-campaign", run_id="campaign-42") as agent:
        agent.check()                      # raises tether.Killed when halted
        agent.report(checkpoint={"batch": 7})
"""

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# gRPC's C core logs at INFO on stderr unless told otherwise (a failed TLS handshake is an
# "I..." line above Tether's own one-line error). ERROR is gRPC's documented default; a
# value the process set itself wins. It must be set before grpc is first imported.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

if TYPE_CHECKING:
    from tether._admin import AdminClient
    from tether._agent import Agent, AsyncAgent
    from tether._certs import check_trust_domain
    from tether._compensate import CompensationReport, compensate
    from tether._config import AgentConfig
    from tether._errors import (
        CapabilityFrozen,
        Degraded,
        FailedPrecondition,
        InvalidArgument,
        Killed,
        NotFound,
        PermissionDenied,
        TetherError,
        TetherLost,
        Unauthenticated,
        Unavailable,
    )
    from tether._gate import DuplicateEffect, Effect
    from tether._permits import (
        PERMIT_METADATA,
        HaltCache,
        InvalidPermit,
        PermitClaims,
        PermitInterceptor,
        PermitVerifier,
    )
    from tether._protection import BreakerStatus, PolicyTest, PolicyVersion, WouldTrip
    from tether._selector import selector
    from tether._types import (
        AgentEvent,
        AgentInstance,
        AgentToken,
        AuditEntry,
        EffectRecord,
        EffectStatus,
        Halt,
        Principal,
        Scope,
        Selector,
        State,
    )
    from tether._undo import MAX_UNDO_BYTES
    from tether._uri import AgentRef, check_name, parse_agent_uri
    from tether._verdict import Verdict

# public name -> the module that defines it, imported on first use: ``tether kill`` needs
# none of the agent's machinery (asyncio tasks, the gate, permits), and an agent none of the CLI.
_LAZY = {
    "AdminClient": "tether._admin",
    "Agent": "tether._agent",
    "AgentConfig": "tether._config",
    "AgentEvent": "tether._types",
    "AgentInstance": "tether._types",
    "AgentRef": "tether._uri",
    "AgentToken": "tether._types",
    "AsyncAgent": "tether._agent",
    "AuditEntry": "tether._types",
    "BreakerStatus": "tether._protection",
    "PolicyTest": "tether._protection",
    "WouldTrip": "tether._protection",
    "CapabilityFrozen": "tether._errors",
    "CompensationReport": "tether._compensate",
    "Degraded": "tether._errors",
    "DuplicateEffect": "tether._gate",
    "Effect": "tether._gate",
    "EffectRecord": "tether._types",
    "EffectStatus": "tether._types",
    "FailedPrecondition": "tether._errors",
    "Halt": "tether._types",
    "HaltCache": "tether._permits",
    "InvalidArgument": "tether._errors",
    "InvalidPermit": "tether._permits",
    "Killed": "tether._errors",
    "MAX_UNDO_BYTES": "tether._undo",
    "NotFound": "tether._errors",
    "PERMIT_METADATA": "tether._permits",
    "PermissionDenied": "tether._errors",
    "PermitClaims": "tether._permits",
    "PermitInterceptor": "tether._permits",
    "PermitVerifier": "tether._permits",
    "PolicyVersion": "tether._protection",
    "Principal": "tether._types",
    "Scope": "tether._types",
    "Selector": "tether._types",
    "State": "tether._types",
    "TetherError": "tether._errors",
    "TetherLost": "tether._errors",
    "Unauthenticated": "tether._errors",
    "Unavailable": "tether._errors",
    "Verdict": "tether._verdict",
    "check_name": "tether._uri",
    "check_trust_domain": "tether._certs",
    "compensate": "tether._compensate",
    "parse_agent_uri": "tether._uri",
    "selector": "tether._selector",
}

__all__ = [
    "MAX_UNDO_BYTES",
    "PERMIT_METADATA",
    "AdminClient",
    "Agent",
    "AgentConfig",
    "AgentEvent",
    "AgentInstance",
    "AgentRef",
    "AgentToken",
    "AsyncAgent",
    "AuditEntry",
    "BreakerStatus",
    "CapabilityFrozen",
    "CompensationReport",
    "Degraded",
    "DuplicateEffect",
    "Effect",
    "EffectRecord",
    "EffectStatus",
    "FailedPrecondition",
    "Halt",
    "HaltCache",
    "InvalidArgument",
    "InvalidPermit",
    "Killed",
    "NotFound",
    "PermissionDenied",
    "PermitClaims",
    "PermitInterceptor",
    "PermitVerifier",
    "PolicyTest",
    "PolicyVersion",
    "Principal",
    "Scope",
    "Selector",
    "State",
    "TetherError",
    "TetherLost",
    "Unauthenticated",
    "Unavailable",
    "Verdict",
    "WouldTrip",
    "check_name",
    "check_trust_domain",
    "compensate",
    "parse_agent_uri",
    "selector",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, then keep the name here.

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    if name == "v1":  # the generated stubs, as ``tether.v1`` was before imports were lazy
        return _importlib.import_module("tether.v1")
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
