#!/usr/bin/env python3
"""Structural check of deploy/kubernetes/herald.yaml (no cluster, no network): the objects and
fields a kubelet needs, probes on herald's admin endpoints, ports and selectors that agree with each
other and with the embedded proxy.toml, an admin listener no other pod can reach, drain timing,
and the proxy.toml itself through `herald check`. Usage: check_k8s.py MANIFEST HERALD_BINARY"""

import os
import re
import subprocess
import sys
import tempfile

import yaml


def fail(msg):
    print(f"deploy/kubernetes: {msg}", file=sys.stderr)
    sys.exit(1)


def need(cond, msg):
    if not cond:
        fail(msg)


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    need(m, f"unreadable duration {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def main(path, herald):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            need(key in d, f"an object lacks {key}")
        need(isinstance(d["metadata"].get("name"), str), f"{d['kind']} has no metadata.name")
        # Companions (herald-cluster.yaml's Redis) are named apart and not herald's to check.
        if d["metadata"]["name"] == "herald":
            by_kind[d["kind"]] = d
    need(set(by_kind) == {"ConfigMap", "Deployment", "Service"}, f"kinds: {sorted(by_kind)}")
    cm, dep, svc = by_kind["ConfigMap"], by_kind["Deployment"], by_kind["Service"]
    need(cm["apiVersion"] == "v1" and svc["apiVersion"] == "v1", "ConfigMap/Service apiVersion v1")
    need(dep["apiVersion"] == "apps/v1", "Deployment apiVersion apps/v1")

    toml_text = cm.get("data", {}).get("proxy.toml")
    need(isinstance(toml_text, str), "ConfigMap data.proxy.toml missing")
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(toml_text)
        f.flush()
        # Variables the pod gets from Secrets (e.g. HERALD_CLUSTER_SECRET) get stand-in values.
        env = dict(os.environ)
        for c in by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    env[e["name"]] = "stand-in-secret-value-0123456789"
        r = subprocess.run([herald, "--config", f.name, "check"], capture_output=True, text=True, env=env)
        need(r.returncode == 0, f"embedded proxy.toml does not validate:\n{r.stdout}{r.stderr}")
    listen = re.search(r'^listen\s*=\s*"[^"]*:(\d+)"', toml_text, re.M)
    admin = re.search(r'^\[admin\][^\[]*?listen\s*=\s*"([^"]*):(\d+)"', toml_text, re.M | re.S)
    need(listen, "proxy.toml has no listen")
    need(admin, "proxy.toml has no [admin] listen (probes need it)")
    need(admin.group(1) in ("127.0.0.1", "[::1]"), "[admin] listen must be loopback: no other pod may reach it")
    drain = re.search(r'drain_timeout\s*=\s*"([^"]+)"', toml_text)
    drain_s = duration_s(drain.group(1)) if drain else 10

    spec = dep["spec"]
    labels = spec["template"]["metadata"]["labels"]
    need(spec["selector"]["matchLabels"].items() <= labels.items(), "selector does not match pod labels")
    need(svc["spec"]["selector"].items() <= labels.items(), "Service selector does not match pods")
    pod = spec["template"]["spec"]
    containers = pod["containers"]
    need(len(containers) == 1, "one container expected")
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    need(ports.get("http") == int(listen.group(1)), f"http port {ports.get('http')} != listen {listen.group(1)}")
    need("admin" not in ports, "the admin port must not be a container port (it is loopback only)")
    for probe, ready in (("readinessProbe", True), ("livenessProbe", False)):
        cmd = c.get(probe, {}).get("exec", {}).get("command")
        need(cmd, f"{probe} must be an exec of `herald health`")
        need(cmd[0].endswith("/herald") and "health" in cmd, f"{probe} runs {cmd}")
        need(("--ready" in cmd) == ready, f"{probe}: --ready only for readiness")
        r = subprocess.run([herald, *cmd[1:], "--help"], capture_output=True, text=True)
        need(r.returncode == 0, f"{probe}: `herald {' '.join(cmd[1:])}` is not a valid command:\n{r.stderr}")
    for p in svc["spec"]["ports"]:
        need(p["targetPort"] in ports or p["targetPort"] in ports.values(), f"Service targetPort {p['targetPort']} unknown")
    need(all(p["targetPort"] != "admin" for p in svc["spec"]["ports"]), "the admin port must not be in the Service")
    pre = c.get("lifecycle", {}).get("preStop", {})
    need(pre, "preStop hook missing (drain needs the endpoints gone first)")
    pre_s = pre.get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    need(grace > pre_s + drain_s, f"terminationGracePeriodSeconds {grace} <= preStop {pre_s}s + drain {drain_s}s")
    sc = c.get("securityContext", {})
    need(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, "container securityContext")
    need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "pod must runAsNonRoot")
    print(f"ok: {path} (ConfigMap, Deployment, Service; admin on loopback, exec probes; proxy.toml valid)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2])
