"""The deploys start: the image's default command has a writable data directory, the
Kubernetes manifests validate against the Kubernetes schemas (``kubernetes-validate``, offline),
and liveness checks the process while readiness checks SERVING."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tether_server import CoordinatorProcess, free_port

from tests.conftest import Etcd, Pki, eventually

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Kinds of custom resources: kubernetes-validate has no schema for them, and says so (WARN).
CUSTOM_GROUPS = ("cert-manager.io/", "kustomize.config.k8s.io/")


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[Path]:
    """Files of Kubernetes resources; rbac.yaml is --rbac's data, put in a ConfigMap."""
    return [
        p
        for p in sorted(KUBERNETES.glob("*.yaml"))
        if all(isinstance(d, dict) and "apiVersion" in d for d in documents(p))
    ]


@pytest.fixture(scope="module")
def offline_schemas() -> None:
    """kubernetes-validate ships its schemas; skip only if it cannot load them here."""
    probe = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "probe"}}
    try:
        kubernetes_validate.validate(probe, kubernetes_validate.latest_version(), strict=True)
    except (kubernetes_validate.SchemaNotFoundError, OSError) as err:
        pytest.skip(f"kubernetes-validate cannot load its schemas offline: {err}")


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    argv = [str(tool), "--strict", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.usefixtures("offline_schemas")
def test_the_kubernetes_manifests_validate() -> None:
    paths = manifests()
    assert {p.name for p in paths} >= {"coordinator.yaml", "etcd.yaml", "networkpolicy.yaml"}
    assert {p.name for p in KUBERNETES.glob("*.yaml")} - {p.name for p in paths} == {"rbac.yaml"}
    result = validate(*paths)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        assert line.startswith(("INFO", "WARN")), line
        if line.startswith("WARN"):  # only custom resources go unchecked
            assert "Couldn't find schema" in line and any(g in line for g in CUSTOM_GROUPS), line


@pytest.mark.usefixtures("offline_schemas")
def test_the_kustomize_build_validates(tmp_path: Path) -> None:
    """What ``kubectl apply -k`` sends, the generated rbac ConfigMap included."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendered build is not checked")
    built = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "built.yaml").write_text(built)
    assert "kind: ConfigMap" in built
    result = validate(tmp_path / "built.yaml")
    assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout


@pytest.mark.usefixtures("offline_schemas")
def test_validation_refuses_a_broken_manifest(tmp_path: Path) -> None:
    (doc,) = [d for d in documents(KUBERNETES / "coordinator.yaml") if d["kind"] == "Deployment"]
    doc["spec"]["replicas"] = "two"
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["cmd"] = ["x"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(doc))
    result = validate(tmp_path / "broken.yaml")
    assert result.returncode != 0 and "ERROR" in result.stdout


# -- probes ---------------------------------------------------------------------------------


def probe_scripts() -> dict[str, str]:
    (deployment,) = [
        d for d in documents(KUBERNETES / "coordinator.yaml") if d["kind"] == "Deployment"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--health-listen=127.0.0.1:7701" in container["args"]
    return {
        kind: container[f"{kind}Probe"]["exec"]["command"][-1] for kind in ("readiness", "liveness")
    }


def run_probe(script: str, health_port: int) -> int:
    code = script.replace("127.0.0.1:7701", f"127.0.0.1:{health_port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_liveness_checks_the_process_and_readiness_checks_serving(tmp_path: Path) -> None:
    """The manifest's own probe scripts, against a real coordinator that then loses etcd:
    it leaves the Service (not ready) and is not restarted (alive)."""
    scripts, health = probe_scripts(), free_port()
    store = Etcd(tmp_path / "etcd").start()
    coordinator = CoordinatorProcess(store.url, lease_ttl=2, log=tmp_path / "coordinator.log")
    try:
        coordinator.start("--health-listen", f"127.0.0.1:{health}")
        assert run_probe(scripts["readiness"], health) == 0
        assert run_probe(scripts["liveness"], health) == 0
        store.stop(signal.SIGKILL)
        eventually(lambda: run_probe(scripts["readiness"], health) == 1, timeout=30)
        assert run_probe(scripts["liveness"], health) == 0
        coordinator.stop(signal.SIGKILL)
        assert run_probe(scripts["liveness"], health) != 0  # a dead process is restarted
    finally:
        coordinator.stop()
        store.stop()


# -- the image ------------------------------------------------------------------------------


def dockerfile() -> dict[str, Any]:
    """The final stage's USER, WORKDIR, ENV, RUN lines and CMD, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    lines = [line.strip() for line in final.splitlines() if line.strip()]
    out: dict[str, Any] = {"ENV": {}, "RUN": []}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "ENV":
            out["ENV"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif word == "RUN":
            out["RUN"].append(rest)
        elif word in ("USER", "WORKDIR", "CMD", "ENTRYPOINT"):
            out[word] = json.loads(rest) if rest.startswith("[") else rest
    return out


def test_the_image_runs_as_its_user_with_a_data_directory_it_owns() -> None:
    image = dockerfile()
    uid = image["USER"].split(":")[0]
    assert uid.isdigit() and uid != "0"  # numeric, so runAsNonRoot can be verified
    data = image["ENV"]["TETHER_DATA_DIR"]
    assert image["WORKDIR"] == data  # nothing is written relative to /
    assert any(f"install -d -o {uid} " in run and run.endswith(data) for run in image["RUN"])


def test_the_image_default_command_serves(tmp_path: Path, pki: Pki) -> None:
    """The image's ENTRYPOINT and CMD as written, with its TETHER_DATA_DIR and a working
    directory elsewhere; only the certificate paths and ports are this test's own."""
    image, data, port, health = dockerfile(), tmp_path / "data", free_port(), free_port()
    (tmp_path / "cwd").mkdir()
    cert, key = pki.coordinator()
    paths = {"tls.crt": str(cert), "tls.key": str(key), "ca.crt": str(pki.ca)}
    argv = [
        paths.get(Path(a).name, a) if a.startswith("/etc/tether/tls/") else a for a in image["CMD"]
    ]
    argv = [a.replace(":7700", f":{port}").replace(":7701", f":{health}") for a in argv]
    assert image["ENTRYPOINT"] == ["tether"] and "--etcd" not in argv
    env = {"TETHER_DATA_DIR": str(data), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "tether", *argv], cwd=tmp_path / "cwd", env=env)
    try:
        scripts = probe_scripts()
        eventually(lambda: run_probe(scripts["readiness"], health) == 0, timeout=60)
        assert (data / "etcd").is_dir() and not any((tmp_path / "cwd").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
