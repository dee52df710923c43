"""Tether: a kill switch for fleets of AI agents.

Inside an agent::

    with tether.Agent("agent://acme/email-campaign", run_id="campaign-42") as agent:
        agent.check()                      # raises tether.Killed when halted
        agent.report(checkpoint={"batch": 7})
"""

import os as _os

# gRPC's C core logs at INFO on stderr unless told otherwise (a failed TLS handshake is an
# "I..." line above Tether's own one-line error). ERROR is gRPC's documented default; a
# value the process set itself wins. It must be set before grpc is first imported.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

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
