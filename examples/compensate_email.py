"""A compensation handler for the email campaign: a retraction for each batch that went out.

``tether compensate`` calls ``retract`` once per landed ``send_email`` effect that carries
undo data, newest first, and records the outcome in the ledger, so a second run never
retracts a batch twice:

    tether compensate --agent agent://acme/email-campaign --since 15m \
        --handler examples.compensate_email:retract            # lists what it would do
    tether compensate ... --handler examples.compensate_email:retract --apply

``examples/email_agent.py`` attaches the undo data (``fx.undo({"batch": ..., ...})``).
Here a retraction is a line appended to ``$RETRACTIONS`` (default ``retractions.log``);
a real handler would send the correction, refund the charge or restore the old value.
Raising marks the compensation failed, with the error, and the next effect goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tether


def retract(effect: tether.EffectRecord) -> None:
    """Send the retraction for one batch; raise if it cannot be sent."""
    undo = effect.undo or {}
    if effect.capability != "send_email" or "batch" not in undo:
        raise ValueError(f"not an email batch: {effect.capability} {effect.key!r}")
    line = {"retract_batch": undo["batch"], "emails": undo.get("emails"), "key": effect.key}
    with Path(os.environ.get("RETRACTIONS", "retractions.log")).open("a") as out:
        out.write(json.dumps(line) + "\n")
