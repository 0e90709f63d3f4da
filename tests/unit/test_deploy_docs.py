"""docs/DEPLOY.md's commands against the rendered manifests: the secrets they create are
the ones the pods require, the monitoring charts they install find each other, and every
setting they name exists."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.unit.deploy_support import by_kind, containers, env_field_exists, nodes

DEPLOY = ROOT / "docs" / "DEPLOY.md"


def commands() -> list[list[str]]:
    """Every shell command of DEPLOY.md's bash blocks, continuation lines joined, as words
    (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", DEPLOY.read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def options(words: list[str]) -> dict[str, list[str]]:
    """`--name value` / `--name=value` / `-n value` options of one command."""
    found: dict[str, list[str]] = {}
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if word.startswith("-") and (eq or i + 1 < len(words)):
            found.setdefault(name, []).append(value if eq else words[i + 1])
    return found


def created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, of DEPLOY.md's `kubectl create secret` commands."""
    secrets: dict[str, set[str]] = {}
    for words in commands():
        if words[:2] != ["kubectl", "-n"] or words[3:5] != ["create", "secret"]:
            continue
        kind, name, opts = words[5], words[6], options(words)
        keys = {"tls.crt", "tls.key"} if kind == "tls" else {
            v.split("=")[0] for o in ("--from-literal", "--from-file") for v in opts.get(o, [])}
        secrets[name] = keys
    return secrets


def secret_refs(docs: list[dict[str, Any]]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(secret, key or None for the whole secret, the reference) of every use."""
    refs: list[tuple[str, str | None, dict[str, Any]]] = []
    for node in nodes(docs):
        if "secretKeyRef" in node:
            refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"],
                         node["secretKeyRef"]))
        if "secretRef" in node:
            refs.append((node["secretRef"]["name"], None, node["secretRef"]))
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            for item in node["secret"].get("items") or [{"key": None}]:
                refs.append((node["secret"]["secretName"], item["key"], node["secret"]))
    return refs


def test_every_secret_is_required_and_created_as_documented(rendered):
    """No secret reference is optional (a forgotten secret keeps the pod from starting
    instead of leaving the API open), no manifest turns authentication off, and DEPLOY.md
    creates every secret the pods and the Ingress need, with the keys they read."""
    _, docs = rendered
    refs = secret_refs(docs)
    assert {name for name, _, _ in refs} >= {"hero-api-tokens", "hero-internal-token"}
    for name, _, ref in refs:
        assert ref.get("optional") is not True, name
    for container in containers(docs):
        for env in container.get("env", []):
            assert not env["name"].endswith("ALLOW_UNAUTHENTICATED"), container["name"]
    created = created_secrets()
    for name, key, _ in refs:
        assert name in created, f"DEPLOY.md does not create the secret {name}"
        assert key is None or key in created[name], (name, key)
    for ingress in by_kind(docs, "Ingress"):
        for tls in ingress["spec"]["tls"]:
            assert {"tls.crt", "tls.key"} <= created[tls["secretName"]]


def helm_installs() -> dict[str, tuple[str, dict[str, list[str]], dict[str, str]]]:
    """Chart name -> (release, options, --set values) of DEPLOY.md's `helm install`s."""
    installs = {}
    for words in commands():
        if words[:2] == ["helm", "install"]:
            opts = options(words)
            sets = dict(v.split("=", 1) for v in opts.get("--set", []))
            installs[words[3].split("/")[-1]] = (words[2], opts, sets)
    return installs


def kube_prometheus_stack_service(release: str) -> str:
    """The Prometheus Service of a kube-prometheus-stack release: the chart's fullname
    (the release name when it contains the chart's name, else release-chart; at most 26
    characters) + "-prometheus" (templates/prometheus/service.yaml, _helpers.tpl)."""
    chart = "kube-prometheus-stack"
    fullname = release if chart in release else f"{release}-{chart}"
    return fullname[:26].rstrip("-") + "-prometheus"


def test_the_documented_adapter_reads_the_documented_prometheus():
    """prometheus-adapter's chart points at `http://prometheus.default.svc` unless told:
    the install line names the Service and port of the Prometheus the docs install, the
    namespace labelled for scraping is that Prometheus', and the adapter's rules are the
    overlay's ConfigMap in the adapter's namespace."""
    import subprocess

    import yaml

    from tests.unit.deploy_support import kubectl

    installs = helm_installs()
    release, stack, _ = installs["kube-prometheus-stack"]
    namespace = stack["-n"][0]
    _, adapter, values = installs["prometheus-adapter"]
    host = f"{kube_prometheus_stack_service(release)}.{namespace}.svc"
    assert values["prometheus.url"] in (f"http://{host}", f"http://{host}.cluster.local")
    assert values["prometheus.port"] == "9090"  # the chart's prometheus.service.port
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / "gpu")],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    rules = next(d for d in by_kind(docs, "ConfigMap")
                 if d["metadata"]["name"] == values["rules.existing"])
    assert rules["metadata"]["namespace"] == adapter["-n"][0] == namespace
    assert "config.yaml" in rules["data"]
    # the release's Prometheus selects PodMonitors labelled with its release name
    monitors = by_kind(docs, "PodMonitor")
    assert monitors and all(m["metadata"]["labels"]["release"] == release for m in monitors)
    labelled = [w for w in commands() if w[:3] == ["kubectl", "label", "namespace"]]
    assert [w[3:] for w in labelled] == [[namespace, "hero-serve/monitoring=true"]]
    scrapers = [peer["namespaceSelector"]["matchLabels"] for d in by_kind(docs, "NetworkPolicy")
                for rule in d["spec"]["ingress"] for peer in rule.get("from", [])
                if "hero-serve/monitoring" in str(peer)]
    assert scrapers and all(s == {"hero-serve/monitoring": "true"} for s in scrapers)


@pytest.mark.parametrize("doc", ["DEPLOY.md", "SECURITY.md"])
def test_every_setting_the_docs_name_exists(doc):
    """`HERO_*` names in the docs are settings of a service, of the single-node vision
    runner, variables docker-compose.yml reads, or `hero ask`'s."""
    from services.language.config import ENV_PREFIX, LanguageConfig
    from services.vision.__main__ import NodeSettings
    from services.vision.config import ENV_PREFIX as VISION_PREFIX
    from services.vision.config import VisionConfig

    compose = (ROOT / "docker-compose.yml").read_text()
    cli = (ROOT / "services" / "cli.py").read_text()
    names = set(re.findall(r"\bHERO_[A-Z][A-Z0-9_]*[A-Z0-9]\b", (ROOT / "docs" / doc).read_text()))
    assert names
    for name in names:
        if name.startswith(ENV_PREFIX):
            assert env_field_exists(LanguageConfig, name, ENV_PREFIX), name
        elif name.startswith(VISION_PREFIX):
            assert env_field_exists(VisionConfig, name, VISION_PREFIX) or \
                env_field_exists(NodeSettings, name, VISION_PREFIX), name
        else:
            assert f"${{{name}" in compose or f'"{name}"' in cli, name
