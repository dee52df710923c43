"""How many HTTP/2 streams and TCP connections this process holds open, from gRPC's channelz.

The killmux phase reports how many streams the coordinator held without knowing how the SDK
shares them: every client socket's channelz counters say how many streams it started and how
many ended, so the difference is what is open now, whatever the SDK does.
"""

from __future__ import annotations

import json
from typing import Any

from grpc._cython import cygrpc  # type: ignore[attr-defined]  # channelz, on by default


def _socket(socket_id: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cygrpc.channelz_get_socket(socket_id))["socket"]
    return dict(data.get("data", {}))


def open_streams() -> tuple[int, int]:
    """(connections, open streams) over every client channel of this process."""
    seen: set[int] = set()
    streams, start = 0, 0
    while True:
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        for channel in channels:
            start = max(start, int(channel["ref"]["channelId"]) + 1)
            for ref in channel.get("subchannelRef", []):
                sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
                for sock in sub["subchannel"].get("socketRef", []):
                    socket_id = int(sock["socketId"])
                    if socket_id in seen:  # subchannels are shared between channels
                        continue
                    seen.add(socket_id)
                    data = _socket(socket_id)
                    started = int(data.get("streamsStarted", 0))
                    ended = int(data.get("streamsSucceeded", 0)) + int(data.get("streamsFailed", 0))
                    streams += started - ended
        if page.get("end") or not channels:
            return len(seen), streams
