"""What an effect's ledger record carries besides its status: undo data, trace and release.

``fx.undo({...})`` (or ``agent.effect(..., undo={...})``) attaches what reverses the effect:
the previous value, the message id, the charge id. It is a JSON object of at most
``MAX_UNDO_BYTES`` encoded; ``tether compensate`` hands it back to a handler.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from tether._errors import InvalidArgument

MAX_UNDO_BYTES = 16 * 1024
"""The most undo data one effect may carry: as compact JSON (UTF-8), and as the ledger
stores it (a protobuf Struct). The coordinator enforces the second too."""


def undo_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """``data`` as the ledger keeps it.

    Raises:
        InvalidArgument: ``data`` is not a JSON object, or is over ``MAX_UNDO_BYTES``.
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument(
            f"undo data must be a JSON object (a dict), got {type(data).__name__}"
        )
    try:
        encoded = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"undo data must be JSON: {err}") from None
    out = struct_pb2.Struct()
    out.update(json.loads(encoded))
    size = max(len(encoded.encode()), out.ByteSize())
    if size > MAX_UNDO_BYTES:
        raise InvalidArgument(
            f"undo data is {size} bytes, over the {MAX_UNDO_BYTES}-byte limit; "
            "keep ids and previous values, and store large blobs elsewhere"
        )
    return out


def current_trace() -> tuple[str, str]:
    """(trace id, span id) in hex of the OpenTelemetry span current here; ('', '') if none.

    Tracing is the agent's choice, not a dependency of the SDK: a process that never
    imported OpenTelemetry has no span, and the SDK does not import it for it.
    """
    if "opentelemetry.trace" not in sys.modules:
        return "", ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
