"""``tether kill`` imports only what it uses: the modules each run loads, read from ``sys.modules``
of a real CLI process. How long that takes is measured in bench (phase ``cli``), not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Coordinator

# Modules a kill never needs, each costing a one-shot command milliseconds to import: the
# agent's machinery and stubs, the dashboard, certificates, policy YAML and CEL, OpenTelemetry, the
# server, and protobuf's JSON conversion. grpc itself imports asyncio, so that one stays.
HEAVY = (
    "google.protobuf.json_format",
    "cryptography",
    "yaml",
    "celpy",
    "cel",
    "opentelemetry",
    "aetcd",
    "tether_server",
    "http.server",
    "tether._agent",
    "tether._verdict",
    "tether.v1.agent_pb2",
    "tether._core",
    "tether._gate",
    "tether._permits",
    "tether._certs",
    "tether._compensate",
    "tether._dashboard",
    "tether._cli._doctor",
    "tether._cli._dashboard",
    "tether._cli._server_verbs",
    "tether._cli._completion",
    # The SDK's listing types (a kill needs only tether._halt), the agent's configuration,
    # and the other verbs' modules: each a millisecond or more, mostly creating classes.
    "tether._types",
    "tether._protection",
    "tether._config",
    "tether._cli._recovery",
    "tether._cli._protect_verbs",
    "tether._cli._certs_verb",
    # The generated stub makes every AdminService method at once and checks grpc's version
    # on import; tether._channel.ServiceStub makes the one a command calls.
    "tether.v1.admin_pb2_grpc",
    "grpc._utilities",
)

# What a usage error never needs: it is refused before anything dials a coordinator.
TRANSPORT = ("grpc", "google.protobuf", "tether.v1", "tether._admin")

# Run ``main`` as the console script would, then list what it loaded into the file argv[1].
_PROBE = """
import json, sys
from tether._cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as stop:  # argparse's usage error
    code = stop.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def _loaded(tmp_path: Path, *argv: str) -> tuple[int, list[str]]:
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.exists(), done.stderr
    found = json.loads(out.read_text())
    return found["code"], found["modules"]


def _heavy(modules: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in heavy)]


def test_a_kill_loads_none_of_the_heavy_modules(
    coord: Coordinator, tenant: str, tmp_path: Path
) -> None:
    argv = ("--addr", coord.addr, "kill", "--tenant", tenant, "--reason", "imports", "--force")
    code, modules = _loaded(tmp_path, *argv)
    assert code == 0
    assert "tether._admin" in modules  # the probe saw a kill that really ran
    assert _heavy(modules) == []


def test_usage_errors_load_none_of_them_either(tmp_path: Path) -> None:
    code, modules = _loaded(tmp_path, "kill", "--tenant", "acme")  # no --reason
    assert code == 2
    assert _heavy(modules) == []
    assert _heavy(modules, TRANSPORT) == []


def test_a_bad_address_is_refused_before_the_transport_loads(tmp_path: Path) -> None:
    code, modules = _loaded(tmp_path, "--addr", "nohost", "kill", "--tenant", "a", "--reason", "r")
    assert code == 2
    assert _heavy(modules, TRANSPORT) == []


def test_the_probe_sees_a_heavy_module_when_a_verb_loads_one(tmp_path: Path) -> None:
    """The check can fail: ``tether completion`` builds every verb's parser, ``doctor`` too."""
    code, modules = _loaded(tmp_path, "completion", "bash")
    assert code == 0
    assert "tether._cli._completion" in _heavy(modules)


def test_the_generated_stubs_are_still_reachable_as_tether_v1() -> None:
    probe = "import tether; print(tether.v1.__name__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "tether.v1"), done.stderr


def test_a_one_shot_verb_with_stdout_closed_exits_cleanly(coord: Coordinator) -> None:
    # Cron and daemons may start a command with stdout closed: Python then has no
    # sys.stdout at all, and the verb must still end with its own code and no traceback.
    argv = [sys.executable, "-m", "tether", "--addr", coord.addr, "agents", "--tenant", "t"]
    done = subprocess.run(
        argv, stdout=None, stderr=subprocess.PIPE, text=True, timeout=60,
        pass_fds=(), preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
