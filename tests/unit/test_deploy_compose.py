"""Images, Compose, metrics and settings: checked offline against the code (checkov,
the Compose spec, the exported metric names, the services' settings models)."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import jsonschema
import yaml

from tests.conftest import ROOT
from tests.unit.deploy_support import (
    DOCKERFILE,
    OVERLAYS,
    SCHEMAS,
    SERVICE_TARGETS,
    all_env,
    by_kind,
    compose_env,
    containers,
    env_field_exists,
    kubectl,
)


def test_checkov_passes_on_both_overlays_and_the_dockerfile(tmp_path):
    """The security scanner from the registry, with the exceptions k8s/checkov.yaml lists
    (each with why). KubeRay's RayService is a custom kind checkov does not read; its
    pods are held to the same rules by the test below."""
    checkov = ROOT / ".venv-scan" / "bin" / "checkov"
    assert checkov.exists(), "no checkov: `make setup` installs it into .venv-scan"
    files = []
    for overlay in OVERLAYS:
        out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                             capture_output=True, text=True, check=True).stdout
        files.append(tmp_path / f"{overlay}.yaml")
        files[-1].write_text(out)
    for framework, paths in (("kubernetes", files), ("dockerfile", [DOCKERFILE])):
        args = [str(checkov), "--config-file", str(ROOT / "k8s" / "checkov.yaml"),
                "--framework", framework]
        for path in paths:
            args += ["-f", str(path)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        passed = re.search(r"Passed checks: (\d+), Failed checks: (\d+)", result.stdout)
        assert passed and int(passed.group(1)) > 0 and passed.group(2) == "0", result.stdout


def test_the_dockerfile_installs_dependencies_before_the_code_and_protoc_apart():
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    stages = {name: parent for parent, name in re.findall(r"^FROM (\S+) AS ([\w-]+)$", text,
                                                           re.M)}
    body = {name: chunk for name, chunk in zip(
        re.findall(r"^FROM \S+ AS ([\w-]+)$", text, re.M),
        re.split(r"^FROM \S+ AS [\w-]+$", text, flags=re.M)[1:], strict=True)}

    def lineage(stage: str) -> list[str]:
        chain = [stage]
        while stages.get(chain[-1]) in stages:
            chain.append(stages[chain[-1]])
        return chain

    for target in SERVICE_TARGETS:
        chain = lineage(target)
        assert "protos" not in chain
        assert not any("grpcio-tools" in body[s] or "grpc_tools" in body[s] for s in chain)
        code = next(s for s in reversed(chain) if "COPY hero_core" in body[s])
        installs = next(s for s in reversed(chain) if "torch==" in body[s])
        assert chain.index(installs) > chain.index(code), "code is copied before the deps"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models", "build"} <= set(ignored)
    assert re.search(r'apt-get install[^\n]*"[\w.+-]+=[^"]+"', text), "apt packages unpinned"


def test_compose_file_matches_the_compose_spec():
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    services = compose["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"vision", "vision-gpu", "prometheus", "grafana", "edge"}
    assert not any(isinstance(s.get("networks"), dict) and "aliases" in str(s["networks"])
                   for n, s in services.items() if not s.get("profiles"))
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    redis_args = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_args
    assert compose["networks"]["backend"]["internal"] and compose["networks"]["cache"]["internal"]
    assert set(services["language"]["networks"]) == {"backend"}
    assert set(services["redis"]["networks"]) == {"cache"}


def compose_runs(compose: dict[str, Any]) -> dict[str, set[str]]:
    """The services each `docker compose ... up` command of the file's header starts."""
    header = (ROOT / "docker-compose.yml").read_text().split("\nname:")[0]
    runs: dict[str, set[str]] = {}
    default = {n for n, s in compose["services"].items() if not s.get("profiles")}
    for line in header.splitlines():
        found = re.match(r"#\s+docker compose (?:--profile (\w+) )?up --build([\w -]*)", line)
        if not found:
            continue
        profile, listed = found.group(1) or "default", found.group(2).split()
        named = set(listed) if listed else default | {
            n for n, s in compose["services"].items() if profile in s.get("profiles", [])}
        runs[profile] = named
    if "tls" in runs:  # "add edge to the gpu command's list"
        runs["gpu+tls"] = runs["gpu"] | {"edge"}
    return runs


def test_every_compose_profile_is_wired_to_its_own_services():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    runs = compose_runs(compose)
    assert set(runs) == {"default", "gpu", "tls", "gpu+tls"}
    prometheus = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    envoy = yaml.safe_load(compose["configs"]["envoy"]["content"])["static_resources"]
    upstream = envoy["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["socket_address"]

    def networks(name: str) -> dict[str, Any]:
        nets = services[name].get("networks", {})
        return {n: {} for n in nets} if isinstance(nets, list) else nets

    def reachable(host: str, source: str, names: set[str]) -> bool:
        return any(host == other or host in (cfg or {}).get("aliases", [])
                   for other in names for net, cfg in networks(other).items()
                   if net in networks(source))

    for run, names in runs.items():
        for host_port in targets:  # Prometheus scrapes this run's services
            assert reachable(host_port.split(":")[0], "prometheus", names), (run, host_port)
        if "edge" in names:  # the TLS proxy forwards to this run's vision service
            assert reachable(upstream["address"], "edge", names), run
        published = [p for n in names for p in services[n].get("ports", [])]
        assert "127.0.0.1:9000:9000" in published, run  # the header's public port
        assert len(published) == len(set(published)), run
        for name in names:
            service = services[name]
            depends = service.get("depends_on", {})
            if isinstance(depends, list):
                depends = {d: {} for d in depends}
            for dependency, condition in depends.items():
                assert dependency in names or condition.get("required") is False, (run, name)
            if "restart" in service:  # long-running (models is a one-shot job)
                assert "healthcheck" in service, (run, name)
    assert {n for n, s in services.items() if "restart" not in s} == {"models"}


def exported_metrics() -> dict[str, str]:
    """Every series name the two services export, as Prometheus sees them: name -> kind."""
    from ray.util import metrics as ray_metrics

    from services.language.metrics import LanguageMetrics
    from services.vision.metrics import VisionMetrics

    names: dict[str, str] = {}
    for family in LanguageMetrics().registry.collect():
        for sample in family.samples:
            names[sample.name] = family.type
    for metric in vars(VisionMetrics()).values():
        kind = {ray_metrics.Counter: "counter", ray_metrics.Histogram: "histogram",
                ray_metrics.Gauge: "gauge"}[next(c for c in (ray_metrics.Counter,
                                                             ray_metrics.Histogram,
                                                             ray_metrics.Gauge)
                                                 if isinstance(metric, c))]
        base = "ray_" + metric._name
        suffixes = {"counter": ["_total"], "gauge": [""],
                    "histogram": ["_bucket", "_count", "_sum"]}[kind]
        names.update({base + suffix: kind for suffix in suffixes})
    return names


def test_metrics_follow_prometheus_conventions():
    names = exported_metrics()
    for name, kind in names.items():
        if name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        assert not re.search(r"_(ms|milliseconds|kb|mb|kib|mib)(_|$)", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        time_like = re.search(r"(ttft|latency|wait|duration|prefill|step|stage)", name)
        if kind == "histogram" and time_like:
            assert re.search(r"_seconds_(bucket|count|sum)$", name), name
        if "bytes" in name:
            assert re.search(r"_bytes(_bucket|_count|_sum|_total)?$", name), name
    families = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in names}
    # one series per fact: errors are requests with a code other than OK
    assert not any(f.endswith("_errors") for f in families), families


def test_the_grafana_dashboard_shows_what_operators_watch_from_real_metrics():
    dashboard = json.loads((ROOT / "k8s" / "base" / "grafana-dashboard.json").read_text())
    names = exported_metrics()
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("cache hit rate", "ttft", "tokens kept", "queue wait", "batch size"):
        assert needed in titles, needed
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\b((?:ray_)?hero_[a-z_]+)", target["expr"]))
            assert used and used <= set(names), (panel["title"], used - set(names))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert compose["configs"]["grafana-dashboard"]["file"] == \
        "./k8s/base/grafana-dashboard.json"
    targets = {c["target"] for c in grafana["configs"]}
    assert "/var/lib/grafana/dashboards/hero-serve.json" in targets
    provider = yaml.safe_load(compose["configs"]["grafana-dashboards"]["content"])
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load(compose["configs"]["grafana-datasource"]["content"])
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {d["uid"] for d in source["datasources"]}


# ---- agreement between the deployment files and the code --------------------------------


def test_environment_variables_name_real_config_fields(rendered):
    from services.language.config import ENV_PREFIX, LanguageConfig
    from services.vision.__main__ import NodeSettings
    from services.vision.config import ENV_PREFIX as VISION_PREFIX
    from services.vision.config import VisionConfig

    _, docs = rendered
    extra_vision = {VISION_PREFIX + name.upper() for name in NodeSettings.model_fields}
    for name in {**all_env(docs), **compose_env()}:
        # every setting of ours, secrets included, is a field of a service's settings
        assert not name.startswith("HERO_") or name.startswith((ENV_PREFIX, VISION_PREFIX)), \
            name
        if name.startswith(ENV_PREFIX):
            assert env_field_exists(LanguageConfig, name, ENV_PREFIX), name
        elif name.startswith(VISION_PREFIX) and name not in extra_vision:
            assert env_field_exists(VisionConfig, name, VISION_PREFIX), name


def test_ports_images_and_metrics_agree_with_the_code(rendered):
    from services.language.config import LanguageConfig
    from services.language.metrics import LanguageMetrics

    _, docs = rendered
    language = LanguageConfig()
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] ==
                     "hero-language"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["grpc"] == int(env["HERO_LANGUAGE_PORT"]) == language.port
    assert ports["metrics"] == int(env["HERO_LANGUAGE_METRICS_PORT"]) == language.metrics_port
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]

    serve = yaml.safe_load((ROOT / "services" / "vision" / "serve_config.yaml").read_text())
    (rayservice,) = by_kind(docs, "RayService")
    vision_svc = rayservice["spec"]["serveService"]
    (grpc_port,) = [p for p in vision_svc["spec"]["ports"] if p["name"] == "serve-grpc"]
    assert grpc_port["targetPort"] == serve["grpc_options"]["port"]

    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    names = {m.name for m in LanguageMetrics().registry.collect()}
    assert metric in names

    def name(image: str) -> str:  # registry/hero-serve/vision:tag -> hero-serve/vision
        return "/".join(image.split(":")[0].split("/")[1:])

    images = {name(c["image"]) for c in containers(docs)}
    stages = set(re.findall(r"^FROM \S+ AS ([\w-]+)$", DOCKERFILE.read_text(), re.M))
    built = {f"hero-serve/{stage}" for stage in stages & SERVICE_TARGETS}
    assert images - built == {"library/redis"}
    assert built == {f"hero-serve/{target}" for target in SERVICE_TARGETS}
    engine = env.get("HERO_LANGUAGE_ENGINE", LanguageConfig().engine)
    assert (engine == "vllm") == (name(container["image"]) == "hero-serve/language-vllm")


def test_compose_and_dockerfiles_agree_with_the_code():
    from services.language.config import LanguageConfig

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scrape = compose["configs"]["prometheus"]["content"]
    assert f"language:{LanguageConfig().metrics_port}" in scrape
    assert "vision:8080" in scrape and compose["services"]["vision"]["environment"][
        "HERO_VISION_METRICS_PORT"] == "8080"
    assert "redis-exporter:9121" in scrape
    assert compose["services"]["redis-exporter"]["environment"]["REDIS_ADDR"].endswith(
        "redis:6379")
    text = DOCKERFILE.read_text()
    runtime, language, vision = (text.split("AS runtime")[1], text.split("AS language")[1],
                                 text.split("AS vision")[1])
    assert re.search(r"^USER hero$", runtime, re.M), "images must not run as root"
    assert "ARG VARIANT=cpu" in text and "FROM base-${VARIANT} AS deps" in text
    assert "FROM runtime AS language" in text and "FROM runtime AS vision" in text
    assert f'"127.0.0.1:{LanguageConfig().port}"' in language.split("FROM")[0]
    assert '"127.0.0.1:9000", "--serve"' in vision
    assert "COPY models" not in text, "weights must not be baked into images"
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert build["dockerfile"] == "services/Dockerfile"
            assert build["target"] in SERVICE_TARGETS
            assert service["image"].startswith(f"hero-serve/{build['target']}:")
            engine = service.get("environment", {}).get("HERO_LANGUAGE_ENGINE")
            assert (engine == "vllm") == (build["target"] == "language-vllm")


def test_secrets_are_referenced_never_committed(rendered):
    _, docs = rendered
    assert not by_kind(docs, "Secret")
    for container in containers(docs):
        for env in container.get("env", []):
            if any(word in env["name"] for word in ("PASSWORD", "SECRET", "TOKEN")):
                assert "valueFrom" in env and "value" not in env, env["name"]


def metrics_ports(service: dict[str, Any]) -> set[int]:
    """The ports a Compose service serves Prometheus metrics on, as its environment sets
    them: our services' `*_METRICS_PORT`, an exporter's `*_WEB_LISTEN_ADDRESS`."""
    ports = set()
    for name, value in service.get("environment", {}).items():
        if name.endswith("_METRICS_PORT") and int(value):
            ports.add(int(value))
        elif name.endswith("_WEB_LISTEN_ADDRESS"):
            ports.add(int(str(value).rsplit(":", 1)[1]))
    return ports


def test_every_running_service_with_a_metrics_port_is_scraped():
    """In each profile's run, Prometheus has a target at every metrics port, by the
    service's name or an alias it has on a network Prometheus joins. The vision
    container's Ray node is registered under a non-loopback address: Ray binds the
    metrics port to 127.0.0.1 alone for a loopback node (the dashboard agent's reporter,
    ray/dashboard/modules/reporter/reporter_agent.py), where Prometheus cannot reach it."""
    from ray._common.network_utils import is_localhost

    from services.vision.__main__ import NodeSettings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    prometheus = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    seen = set(services["prometheus"]["networks"])

    def names(name: str) -> set[str]:
        nets = services[name].get("networks", {})
        nets = nets if isinstance(nets, dict) else {n: {} for n in nets}
        return {name} | {a for net, cfg in nets.items() if net in seen
                         for a in (cfg or {}).get("aliases", [])}

    for run, running in compose_runs(compose).items():
        scraped = [(name, port) for name in running for port in metrics_ports(services[name])]
        assert {n for n, _ in scraped} >= {"redis-exporter"} and len(scraped) >= 3, run
        for name, port in scraped:
            assert any(f"{host}:{port}" in targets for host in names(name)), (run, name, port)
    for name, service in services.items():
        if service.get("build", {}).get("target") == "vision":
            node_ip = service["environment"].get("HERO_VISION_NODE_IP")
            assert node_ip is not None, name
            address = NodeSettings(node_ip=node_ip).ray_node_ip()
            assert address is None or not is_localhost(address), name


def test_only_the_default_profile_runs_without_tokens():
    """The services refuse to start without API tokens unless told otherwise: the CPU
    profile's two services are (for a laptop; tokens from the shell still apply), the gpu
    services never are."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    runs = compose_runs(compose)
    open_ = {name for name, s in services.items()
             for key, value in s.get("environment", {}).items()
             if key.endswith("_ALLOW_UNAUTHENTICATED") and str(value).lower() == "true"}
    assert open_ == {"language", "vision"} <= runs["default"]
    assert not open_ & runs["gpu"]
    for name in ("language", "vision", "language-gpu", "vision-gpu"):
        env = services[name]["environment"]
        (tokens,) = [v for k, v in env.items() if k.endswith("_API_TOKENS")]
        assert tokens.startswith("${HERO_") and tokens.endswith(":-}"), name  # from the shell


def test_every_shipped_vision_service_requires_a_cache_secret(rendered):
    """No shipped configuration runs the cache unsigned: a Redis-level writer cannot
    forge entries. Kubernetes refuses to start a pod without the secret (not optional),
    Compose refuses to start without HERO_CACHE_SECRET, and neither allows unsigned
    entries."""
    _, docs = rendered
    vision = [c for c in containers(docs)
              if any(e["name"].startswith("HERO_VISION_") for e in c.get("env", []))]
    assert vision
    for container in vision:
        ref = {e["name"]: e for e in container["env"]}["HERO_VISION_CACHE__SECRET"]
        key_ref = ref["valueFrom"]["secretKeyRef"]
        assert key_ref["name"] == "hero-cache-secret" and not key_ref.get("optional")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        if any(k.startswith("HERO_VISION_") for k in env):
            assert re.fullmatch(r"\$\{HERO_CACHE_SECRET:\?[^}]+\}",
                                env["HERO_VISION_CACHE__SECRET"]), name
    every_value = json.dumps(docs) + json.dumps(compose) + \
        (ROOT / "services" / "vision" / "serve_config.yaml").read_text()
    assert "allow_unsigned" not in every_value.lower() \
        and "HERO_VISION_CACHE__ALLOW_UNSIGNED" not in every_value
