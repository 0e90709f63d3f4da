"""Deployment files, checked offline: Kubernetes schemas, the KubeRay CRD, Ray's Serve
schema, the Compose spec, real kustomize renders, and agreement with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

# Third-party schemas the tests validate against, carried with their licences
# (tests/schemas/*/SOURCE.md says where each came from).
SCHEMAS = ROOT / "tests" / "schemas"
DOCKERFILE = ROOT / "services" / "Dockerfile"
SERVICE_TARGETS = {"language", "language-vllm", "vision"}
OVERLAYS = ("dev", "gpu")


def kubectl() -> str:
    found = shutil.which("kubectl") or str(ROOT / "build" / "kubectl" / "kubectl")
    assert Path(found).exists(), "no kubectl: `make setup` runs .ci/fetch_kubectl"
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / request.param)],
                         capture_output=True, text=True, check=True)
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_overlays_render_every_part(rendered):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy", "RayService", "ConfigMap"} <= kinds
    # prometheus-adapter's rules live in the adapter's namespace
    assert all(d["metadata"].get("namespace") == "hero-serve" for d in docs
               if d["kind"] != "Namespace" and d["metadata"]["name"] != "hero-adapter-rules")


def test_built_in_kinds_pass_strict_kubernetes_validation(rendered):
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/")):
            continue  # custom resources: the KubeRay CRD is checked below
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
        checked += 1
    assert checked >= 12


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever the CRD does not allow them."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / "kuberay" / "ray.io_rayservices.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


def test_rayservice_matches_the_kuberay_crd(rendered, rayservice_schema):
    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    jsonschema.validate(service, rayservice_schema)
    broken = json.loads(json.dumps(service))
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParamz"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, rayservice_schema)


def test_serve_config_v2_is_valid_for_ray_serve_and_the_app(rendered):
    from ray.serve.schema import ServeDeploySchema

    from services.vision.config import VisionConfig

    overlay, docs = rendered
    (service,) = by_kind(docs, "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = config.applications[0]
    args = VisionConfig.model_validate(app.args)
    assert args.language_target == \
        "dns:///hero-language-headless.hero-serve.svc.cluster.local:50052"
    scheme = "rediss" if overlay == "gpu" else "redis"
    assert args.cache.url.startswith(f"{scheme}://hero-redis:6379")
    if overlay == "gpu":  # the CA the URL needs is mounted where the config says
        mounts = [m["mountPath"] for c in _containers([service]) for m in c["volumeMounts"]]
        assert str(Path(args.cache.tls_ca_file).parent) in mounts
    encoder = next(d for d in app.deployments if d.name == "Encoder")
    assert encoder.ray_actor_options.num_gpus == (1 if overlay == "gpu" else 0)
    assert args.device == ("cuda" if overlay == "gpu" else "cpu")


def test_the_repo_serve_config_is_valid_and_the_k8s_copy_is_rendered_from_it():
    from ray.serve.schema import ServeDeploySchema

    from k8s import render
    from services.vision.config import VisionConfig

    config = ServeDeploySchema.model_validate(yaml.safe_load(render.SERVE_CONFIG.read_text()))
    VisionConfig.model_validate(config.applications[0].args)
    for path, text in render.rendered().items():
        assert path.read_text() == text, f"{path.name} is stale: run python k8s/render.py"


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_ray_probes_run_commands_the_image_has(rendered):
    """KubeRay's default probes call wget, which the images lack: ours are set explicitly,
    run `python -m services.healthcheck` (in every image), and parse."""
    from services import healthcheck

    _, docs = rendered
    dockerfile = DOCKERFILE.read_text()
    assert "COPY services services" in dockerfile
    probes = [(c, kind) for c in _containers(docs)
              for kind in ("readinessProbe", "livenessProbe", "startupProbe") if kind in c]
    assert probes
    for container, kind in probes:
        probe = container[kind]
        if "exec" not in probe:
            assert "grpc" in probe or "httpGet" in probe, (container["name"], kind)
            continue
        command = probe["exec"]["command"]
        if not container["image"].split("/")[-2:][0].startswith("hero-serve"):
            # a third-party image: its own client (the official Redis image has redis-cli)
            assert container["image"].split("/")[-1].startswith("redis:"), container["image"]
            assert command[0] == "redis-cli" or (command[:2] == ["sh", "-c"] and \
                command[2].startswith("redis-cli ")), command
            continue
        assert command[:3] == ["python", "-m", "services.healthcheck"], command
        healthcheck.parser().parse_args(command[3:])  # exits on a bad argument
    for service in by_kind(docs, "RayService"):
        for container in _containers([service]):
            if container["name"].startswith("ray-"):
                assert {"readinessProbe", "livenessProbe"} <= container.keys()


def test_the_kuberay_operator_reaches_what_it_checks(rendered):
    _, docs = rendered
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "hero-vision-ingress")
    allowed = {p["port"] for rule in policy["spec"]["ingress"]
               for peer in rule.get("from", [])
               if peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                   "kubernetes.io/metadata.name") == "kuberay-system"
               for p in rule.get("ports", [])}
    assert {8265, 52365, 8000} <= allowed  # dashboard, dashboard agent, Serve proxy


def test_the_public_service_selects_serving_pods_only(rendered):
    """The public gRPC Service is KubeRay's serve Service (it selects pods whose Serve
    proxy is healthy in the cluster that serves); no hand-written Service selects every
    vision pod."""
    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    serve = service["spec"]["serveService"]
    assert serve["metadata"]["name"] == "hero-vision-grpc"
    assert {p["port"] for p in serve["spec"]["ports"]} == {9000}
    assert "selector" not in serve["spec"]  # KubeRay sets it
    for other in by_kind(docs, "Service"):
        selector = other["spec"].get("selector", {})
        assert selector.get("app.kubernetes.io/name") != "hero-vision", other["metadata"]
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "hero-vision-grpc", "port": {"number": 9000}}


def test_language_calls_go_to_every_pod_through_a_headless_service(rendered):
    from services.vision.config import VisionConfig

    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = VisionConfig.model_validate(config["applications"][0]["args"])
    assert args.language_target.startswith("dns:///") and args.language_lb_policy == \
        "round_robin"
    host = args.language_target.removeprefix("dns:///").split(".")[0]
    headless = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == host)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == {"app.kubernetes.io/name": "hero-language"}


def test_the_hpa_metric_has_a_rule_that_produces_it_and_targets_near_80_percent(rendered):
    overlay, docs = rendered
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom == ["hero_language_in_flight"]
    (language,) = [d for d in by_kind(docs, "Deployment")
                   if d["metadata"]["name"] == "hero-language"]
    env = _env(language["spec"]["template"]["spec"]["containers"][0])
    slots = int(env.get("HERO_LANGUAGE_VLLM__MAX_NUM_SEQS") if env.get(
        "HERO_LANGUAGE_ENGINE") == "vllm" else env["HERO_LANGUAGE_BATCHING__MAX_BATCH_SIZE"])
    target = next(float(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]
                  if m["type"] == "Pods")
    assert 0.7 <= target / slots <= 0.9, (target, slots)
    pdb = next(d for d in by_kind(docs, "PodDisruptionBudget")
               if d["metadata"]["name"] == "hero-language")
    minimum = hpa["spec"]["minReplicas"]
    allowed = (pdb["spec"]["maxUnavailable"] if "maxUnavailable" in pdb["spec"]
               else minimum - pdb["spec"]["minAvailable"])
    assert allowed >= 1, "the PDB blocks every drain at the minimum replica count"
    if overlay != "gpu":
        return
    rules = yaml.safe_load(next(d for d in by_kind(docs, "ConfigMap") if d["metadata"][
        "name"] == "hero-adapter-rules")["data"]["config.yaml"])["rules"]
    produced = {rule["name"]["as"] for rule in rules
                if re.fullmatch(rule["name"]["matches"], "hero_language_in_flight")
                and "hero_language_in_flight" in rule["seriesQuery"]}
    assert produced == {"hero_language_in_flight"}
    monitors = [d for d in docs if d["kind"] == "PodMonitor"
                and d["spec"]["selector"]["matchLabels"] == {
                    "app.kubernetes.io/name": "hero-language"}]
    ports = {p["name"] for c in language["spec"]["template"]["spec"]["containers"]
             for p in c["ports"]}
    assert monitors and all(e["port"] in ports for m in monitors
                            for e in m["spec"]["podMetricsEndpoints"])


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


def release() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_images_are_fully_qualified_tied_to_the_release_and_pulled_explicitly(rendered):
    overlay, docs = rendered
    variant = "cuda" if overlay == "gpu" else "cpu"
    registries = set()
    for container in _containers(docs):
        image = container["image"]
        registry, _, rest = image.partition("/")
        assert "." in registry and ":" in rest, f"{image} is not registry/name:tag"
        assert container.get("imagePullPolicy") in ("IfNotPresent", "Always"), image
        if rest.startswith("hero-serve/"):
            registries.add(registry)
            assert rest.endswith(f":{release()}-{variant}"), image
    assert len(registries) == 1  # one registry for every image of ours


def test_every_pod_and_container_is_locked_down_and_sized(rendered):
    _, docs = rendered
    for node in nodes(docs):
        if not isinstance(node.get("containers"), list):
            continue
        assert node["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert node["securityContext"]["runAsNonRoot"] is True
        for key in ("containers", "initContainers"):
            for container in node.get(key, []):
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, container["name"]
                assert context.get("capabilities", {}).get("drop") == ["ALL"]
                resources = container.get("resources", {})
                assert resources.get("requests", {}).get("cpu"), container["name"]
                assert resources.get("limits", {}).get("memory"), container["name"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[:-2]) * factor)
    return int(quantity)


def test_rays_object_store_fits_in_shared_memory(rendered):
    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        store = int(group["rayStartParams"]["object-store-memory"])
        shm = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert _bytes(shm["emptyDir"]["sizeLimit"]) >= store, group.get("groupName", "head")


def test_the_request_size_bound_is_set_wherever_requests_arrive(rendered):
    """Serve's proxy reads its bound from the pods' environment; NGINX has its own body
    limit. Both follow the app's `max_request_bytes` (the image limit plus headroom)."""
    from services.vision.config import VisionConfig

    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    bound = VisionConfig.model_validate(config["applications"][0]["args"]).max_request_bytes
    ray = [c for c in _containers([service]) if c["name"].startswith("ray-")]
    assert {c["name"] for c in ray} == {"ray-head", "ray-worker"}  # proxies run on both
    for container in ray:
        assert int(_env(container)["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == bound, container["name"]
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and bound <= int(body[:-1]) << 20 < bound + (1 << 20)


def test_the_public_endpoint_has_tls_in_front_of_it(rendered):
    # Compose: Envoy ends TLS on 9443 and forwards HTTP/2 to the vision service.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    edge = compose["services"]["edge"]
    assert edge["ports"] == ["127.0.0.1:9443:9443"] and edge["profiles"] == ["tls"]
    envoy = yaml.safe_load(compose["configs"]["envoy"]["content"])["static_resources"]
    chain = envoy["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("DownstreamTlsContext")
    files = {c["certificate_chain"]["filename"] for c in
             tls["common_tls_context"]["tls_certificates"]}
    assert files == {f"/run/secrets/{s['target']}" for s in edge["secrets"]
                     if s["target"].endswith(".crt")}
    upstream = envoy["clusters"][0]
    address = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "vision", "port_value": 9000}
    assert "http2_protocol_options" in str(upstream)
    assert all("file" in s for s in compose["secrets"].values())
    # Kubernetes: the Ingress ends TLS and speaks gRPC to the Service; port 9000 admits only
    # the ingress controller and labelled in-cluster clients.
    _, docs = rendered
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    assert ingress["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ingress["spec"]["tls"][0]["secretName"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    (rayservice,) = by_kind(docs, "RayService")
    service = rayservice["spec"]["serveService"]  # KubeRay's, selecting serving pods
    assert service["metadata"]["name"] == backend["name"]
    assert backend["port"]["number"] == service["spec"]["ports"][0]["port"] == 9000
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "hero-vision-ingress")
    public = [r for r in policy["spec"]["ingress"]
              if any(p["port"] == 9000 for p in r.get("ports", []))]
    assert public and all(r.get("from") for r in public)


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

def env_field_exists(model: Any, name: str, prefix: str) -> bool:
    path = name[len(prefix):].lower().split("__")
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            model = field.annotation
    return True


def nodes(tree: Any) -> list[dict[str, Any]]:
    """Every mapping inside a parsed YAML tree."""
    if isinstance(tree, dict):
        return [tree, *(n for v in tree.values() for n in nodes(v))]
    if isinstance(tree, list):
        return [n for v in tree for n in nodes(v)]
    return []


def all_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for node in nodes(docs)
            if isinstance(node.get("env"), list) for e in node["env"]}


def compose_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env: dict[str, str] = {}
    for service in compose["services"].values():
        env.update(service.get("environment", {}))
    return env


def test_environment_variables_name_real_config_fields(rendered):
    from services.language.config import ENV_PREFIX, LanguageConfig
    from services.vision.__main__ import ENV_PREFIX as VISION_PREFIX
    from services.vision.config import VisionConfig

    _, docs = rendered
    extra_vision = {"HERO_VISION_GRPC_PORT", "HERO_VISION_METRICS_PORT"}
    for name in {**all_env(docs), **compose_env()}:
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
    assert vision_svc["spec"]["ports"][0]["targetPort"] == serve["grpc_options"]["port"]

    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    names = {m.name for m in LanguageMetrics().registry.collect()}
    assert metric in names

    def name(image: str) -> str:  # registry/hero-serve/vision:tag -> hero-serve/vision
        return "/".join(image.split(":")[0].split("/")[1:])

    images = {name(c["image"]) for c in _containers(docs)}
    stages = set(re.findall(r"^FROM \S+ AS ([\w-]+)$", DOCKERFILE.read_text(), re.M))
    built = {f"hero-serve/{stage}" for stage in stages & SERVICE_TARGETS}
    assert images - built == {"library/redis"}
    assert built == {f"hero-serve/{target}" for target in SERVICE_TARGETS}
    engine = env.get("HERO_LANGUAGE_ENGINE", LanguageConfig().engine)
    assert (engine == "vllm") == (name(container["image"]) == "hero-serve/language-vllm")


def _containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for node in nodes(docs) for key in ("containers", "initContainers")
            if isinstance(node.get(key), list) for c in node[key]]


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
    for container in _containers(docs):
        for env in container.get("env", []):
            if any(word in env["name"] for word in ("PASSWORD", "SECRET", "TOKEN")):
                assert "valueFrom" in env and "value" not in env, env["name"]
