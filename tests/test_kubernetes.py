"""The Kubernetes manifests of ``scripts/kubernetes/`` cannot drift from the CLI.

Each container's exact command and arguments, with the environment the manifest
gives it (values, Secret keys, the completion index) expanded as Kubernetes
does (``$(VAR)``), run here through the real ``snapshotter`` command against a
local config put where the manifest mounts its config Secret; the metrics
sidecar's script runs beside it and pushes the textfile to a local HTTP server
when stopped.  The example configs in the Secrets load, and the pod failure
policies keep exit 8 from being retried.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml  # PyYAML comes with chromadb, a dependency of the package

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "scripts" / "kubernetes"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def documents() -> list[dict]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def named(kind: str, name: str) -> dict:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} in scripts/kubernetes"
    return found[0]


def job_spec(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values: $$ is a literal $,
    and a reference to a variable the container does not have stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Pod:
    """A pod of the manifest, on this machine: each volume a folder under ``root``."""

    def __init__(self, spec: dict, root: Path, index: int | None = None):
        self.spec, self.root, self.index = spec, root, index
        self.volumes = {v["name"]: v for v in spec["volumes"]}
        for name in self.volumes:
            (root / name).mkdir(parents=True, exist_ok=True)

    def container(self, name: str) -> dict:
        (c,) = [c for c in self.spec["containers"] + self.spec.get("initContainers", []) if c["name"] == name]
        return c

    def local(self, c: dict, text: str) -> str:
        """A path inside the container as the folder of its volume here."""
        for mount in c.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if text.startswith(prefix):
                return str(self.root / mount["name"] / text[len(prefix):])
        return text

    def env(self, c: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for ref in c.get("envFrom", []):
            env.update(named("Secret", ref["secretRef"]["name"])["stringData"])
        for var in c.get("env", []):
            if "value" in var:
                env[var["name"]] = self.local(c, expand(var["value"], env))
            else:
                assert var["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION, var
                assert self.index is not None, f"{var['name']}: the completion index outside an Indexed Job"
                env[var["name"]] = str(self.index)
        return env

    def argv(self, c: dict) -> list[str]:
        env = self.env(c)
        return [self.local(c, expand(a, env)) for a in c["command"] + c.get("args", [])]

    def config_secret(self, c: dict) -> tuple[dict, Path]:
        """The Secret mounted as the config folder, and that folder here."""
        for mount in c["volumeMounts"]:
            volume = self.volumes[mount["name"]]
            if "secret" in volume:
                return named("Secret", volume["secret"]["secretName"]), self.root / mount["name"]
        raise AssertionError(f"container {c['name']}: no Secret mounted")


@pytest.fixture
def shim(tmp_path) -> dict:
    """``snapshotter`` on PATH, as the image has it: this checkout's CLI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "snapshotter"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m snapshotter "$@"\n')
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def pushgateway():
    """A local HTTP server that keeps what is pushed to it: [(method, path, body)]."""
    pushed: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            pushed.append((self.command, self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pushed
    server.shutdown()
    server.server_close()


def local_config(path: Path, repo: Path, db: Path, rows: int) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS kb (id INTEGER PRIMARY KEY, body TEXT)")
    con.executemany("INSERT OR REPLACE INTO kb VALUES (?, ?)", [(i, f"{db.stem} row {i}") for i in range(rows)])
    con.commit()
    con.close()
    path.write_text(f'[repository]\nurl = "{repo}"\n\n[sources.retrieval]\nbackend = "sql"\nurl = "sqlite:///{db}"\n')


def run_pod(pod: Pod, main: str, sidecar: str, shim: dict, gateway: str) -> tuple[subprocess.CompletedProcess, str]:
    """The sidecar started, the main container run to its end, then the sidecar stopped
    (SIGTERM) as the kubelet does: the main container's result and the sidecar's stderr."""
    side = pod.container(sidecar)
    side_env = {**shim, **pod.env(side), "PUSHGATEWAY_URL": gateway}
    helper = subprocess.Popen(pod.argv(side), env=side_env, stderr=subprocess.PIPE, text=True)
    try:
        c = pod.container(main)
        p = subprocess.run(pod.argv(c), env={**shim, **pod.env(c)}, capture_output=True, text=True, timeout=120)
    finally:
        helper.send_signal(signal.SIGTERM)
        _, side_err = helper.communicate(timeout=30)
    assert helper.returncode == 0, side_err
    return p, side_err


def snapshots(shim: dict, config: Path) -> list[dict]:
    p = subprocess.run(["snapshotter", "--config", str(config), "--json", "list"], env=shim,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_the_agent_cronjob_runs_as_written_and_pushes_its_metrics(tmp_path, shim, pushgateway):
    gateway, pushed = pushgateway
    cron = named("CronJob", "snapshotter-agent")
    pod = Pod(job_spec(cron)["template"]["spec"], tmp_path / "pod")
    main = pod.container("snapshot")
    secret, folder = pod.config_secret(main)
    argv = pod.argv(main)
    config = Path(argv[argv.index("--config") + 1])
    assert config.parent == folder and config.name in secret["stringData"], "the config the Secret holds"
    local_config(config, tmp_path / "repo", tmp_path / "agent.db", 20)
    assert subprocess.run(["snapshotter", "--config", str(config), "init"], env=shim).returncode == 0

    p, _ = run_pod(pod, "snapshot", "push-metrics", shim, gateway)
    assert p.returncode == 0, p.stderr
    (snap,) = snapshots(shim, config)
    env = pod.env(main)
    assert snap["release"] == env["AGENT_RELEASE"] and snap["labels"] == {"agent": env["AGENT_NAME"]}

    metrics = Path(pod.local(main, "/metrics/snapshotter-snapshot.prom"))
    assert 'snapshotter_exit_code{command="snapshot"' in metrics.read_text()
    assert pushed == [("POST", f"/metrics/job/snapshotter/agent/{env['AGENT_NAME']}", metrics.read_bytes())]


def test_the_fleet_job_snapshots_one_agent_per_completion_index(tmp_path, shim, pushgateway):
    gateway, pushed = pushgateway
    spec = job_spec(named("CronJob", "snapshotter-fleet"))
    assert spec["completionMode"] == "Indexed"
    repo = tmp_path / "repo"
    for index in range(spec["completions"]):
        pod = Pod(spec["template"]["spec"], tmp_path / f"pod-{index}", index)
        main = pod.container("snapshot")
        secret, folder = pod.config_secret(main)
        argv = pod.argv(main)
        config = Path(argv[argv.index("--config") + 1])
        assert config.parent == folder and config.name == f"agent-{index}.toml"
        assert config.name in secret["stringData"], f"completion index {index} has its config in the Secret"
        local_config(config, repo, tmp_path / f"agent-{index}.db", 10 + index)
        if index == 0:
            assert subprocess.run(["snapshotter", "--config", str(config), "init"], env=shim).returncode == 0
        p, _ = run_pod(pod, "snapshot", "push-metrics", shim, gateway)
        assert p.returncode == 0, p.stderr

    release = pod.env(main)["FLEET_RELEASE"]
    found = {(s["release"], s["labels"]["agent"], s["records"]) for s in snapshots(shim, config)}
    assert found == {(f"{release}-agent-{i}", str(i), 10 + i) for i in range(spec["completions"])}
    assert [path for _, path, _ in pushed] == [f"/metrics/job/snapshotter-fleet/agent/{i}"
                                                 for i in range(spec["completions"])]


def test_a_failed_snapshot_reaches_the_failure_policy_with_its_own_exit_code(tmp_path, shim, pushgateway):
    """The container's exit code is snapshotter's (no shell in between), and the metrics
    of the failed run are pushed all the same."""
    gateway, pushed = pushgateway
    pod = Pod(job_spec(named("CronJob", "snapshotter-agent"))["template"]["spec"], tmp_path / "pod")
    main = pod.container("snapshot")
    assert main["command"] == ["snapshotter"]
    argv = pod.argv(main)
    config = Path(argv[argv.index("--config") + 1])
    local_config(config, tmp_path / "no-repo", tmp_path / "agent.db", 5)  # never initialised: exit 5
    p, _ = run_pod(pod, "snapshot", "push-metrics", shim, gateway)
    assert p.returncode == 5, p.stderr
    assert b"snapshotter_exit_code" in pushed[0][2]


def test_exit_8_fails_the_job_or_its_index_without_a_retry():
    agent = job_spec(named("CronJob", "snapshotter-agent"))
    fleet = job_spec(named("CronJob", "snapshotter-fleet"))
    for spec, action in ((agent, "FailJob"), (fleet, "FailIndex")):
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # a podFailurePolicy needs it
        rules = spec["podFailurePolicy"]["rules"]
        on_exit = [r for r in rules if "onExitCodes" in r]
        assert on_exit == [{"action": action,
                            "onExitCodes": {"containerName": "snapshot", "operator": "In", "values": [8]}}]
        assert rules.index(on_exit[0]) == 0, "checked before any other rule"
    assert fleet["backoffLimitPerIndex"] >= 1  # FailIndex needs it


def test_the_example_configs_in_the_secrets_load(monkeypatch, tmp_path):
    from snapshotter.config import load_config
    monkeypatch.setenv("AGENT_DB_PASSWORD", "s3cret")
    configs = {**named("Secret", "snapshotter-config")["stringData"],
               **named("Secret", "snapshotter-fleet")["stringData"]}
    assert len(configs) == 4
    for name, text in configs.items():
        path = tmp_path / name
        path.write_text(text)
        cfg = load_config(str(path))
        assert cfg.repository_url.startswith("s3://") and cfg.sources, name
