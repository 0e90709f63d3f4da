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
    assert all(d["metadata"].get("namespace") == "hero-serve" for d in docs
               if d["kind"] != "Namespace")


def test_built_in_kinds_pass_strict_kubernetes_validation(rendered):
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            continue
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
    assert args.language_target == "hero-language:50052"
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
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == bound, container["name"]
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
    service = next(d for d in docs if d["kind"] == "Service"
                   and d["metadata"]["name"] == backend["name"])
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
    assert published == {"vision", "vision-gpu", "prometheus", "edge"}
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    redis_args = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_args
    assert compose["networks"]["backend"]["internal"] and compose["networks"]["cache"]["internal"]
    assert set(services["language"]["networks"]) == {"backend"}
    assert set(services["redis"]["networks"]) == {"cache"}


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
    (vision_svc,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] ==
                     "hero-vision-grpc"]
    assert vision_svc["spec"]["ports"][0]["targetPort"] == serve["grpc_options"]["port"]

    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    names = {m.name for m in LanguageMetrics().registry.collect()}
    assert metric in names

    images = {c["image"].split(":")[0] for c in _containers(docs)}
    stages = set(re.findall(r"^FROM \S+ AS ([\w-]+)$", DOCKERFILE.read_text(), re.M))
    built = {f"hero-serve/{stage}" for stage in stages & SERVICE_TARGETS}
    assert images - built == {"redis"}
    assert built == {f"hero-serve/{target}" for target in SERVICE_TARGETS}
    engine = env.get("HERO_LANGUAGE_ENGINE", LanguageConfig().engine)
    assert (engine == "vllm") == (container["image"].split(":")[0] == "hero-serve/language-vllm")


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
    assert "ARG VARIANT=cpu" in text and "FROM base-${VARIANT} AS runtime" in text
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
