"""The deployment examples: Prometheus accepts the scrape config (with the
alert rules it loads), the DaemonSet has what tracing needs, the systemd
unit runs the exporter and treats its SIGTERM exit as a clean stop."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_the_scrape_config_and_its_rules():
    r = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


def test_daemonset_is_privileged_in_the_host_pid_namespace_with_the_kernel_mounts():
    yaml = pytest.importorskip("yaml")
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "ksmtrace-daemonset.yaml")
                                   .read_text()))
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    assert c["args"][0] == "export" and "--listen" in c["args"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/sys/kernel/btf",
                 "/lib/modules", "/usr/src"):
        assert mounts[path]["readOnly"] is True, path
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/sys/kernel/btf"]["name"]]["hostPath"]["path"] == "/sys/kernel/btf"
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(c["ports"][0]["containerPort"]) == "9949"
    scrape = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-scrape.yml").read_text())
    assert scrape["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"


def test_systemd_unit_runs_the_exporter_and_stops_cleanly():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "ksmtrace-exporter.service")
    svc = unit["Service"]
    argv = svc["ExecStart"].split()
    assert argv[0].endswith("/ksmtrace") and argv[1] == "export"
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:9949"
    assert "143" in svc["SuccessExitStatus"].split()  # 128 + SIGTERM: probes detached
    assert svc["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
