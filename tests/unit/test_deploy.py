"""Kubernetes manifests, checked offline: Kubernetes schemas, the KubeRay CRD, Ray's Serve
schema and real kustomize renders of both overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT
from tests.unit.deploy_support import (
    DOCKERFILE,
    SCHEMAS,
    by_kind,
    containers,
    nodes,
    release,
    service_ports,
)


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
        mounts = [m["mountPath"] for c in containers([service]) for m in c["volumeMounts"]]
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
    probes = [(c, kind) for c in containers(docs)
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
        for container in containers([service]):
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
    assert {p["name"]: p["port"] for p in serve["spec"]["ports"]} == {"serve": 8000,
                                                                      "serve-grpc": 9000}
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


def test_images_are_fully_qualified_tied_to_the_release_and_pulled_explicitly(rendered):
    overlay, docs = rendered
    variant = "cuda" if overlay == "gpu" else "cpu"
    registries = set()
    for container in containers(docs):
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


def test_the_request_size_bound_is_set_wherever_requests_arrive(rendered):
    """Serve's proxy reads its bound from the pods' environment; NGINX has its own body
    limit. Both follow the app's `max_request_bytes` (the image limit plus headroom)."""
    from services.vision.config import VisionConfig

    _, docs = rendered
    (service,) = by_kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    bound = VisionConfig.model_validate(config["applications"][0]["args"]).max_request_bytes
    ray = [c for c in containers([service]) if c["name"].startswith("ray-")]
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
    assert edge["ports"] == ["127.0.0.1:9443:9443", "127.0.0.1:8443:8443"]
    assert edge["profiles"] == ["tls"]
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
    assert backend["port"]["number"] == 9000 and service_ports(service)[9000] == 9000
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "hero-vision-ingress")
    public = [r for r in policy["spec"]["ingress"]
              if any(p["port"] == 9000 for p in r.get("ports", []))]
    assert public and all(r.get("from") for r in public)


def test_the_openai_api_is_exposed_as_the_grpc_api_is(rendered):
    """HTTP (Serve's proxy on 8000: the OpenAI-compatible API) beside gRPC (9000): behind
    TLS (Envoy on 8443, the ingress controller), on the serve Service, admitted only from
    the ingress controller and labelled clients, with the API's own body bound."""
    from services.vision.config import VisionConfig

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("vision", "vision-gpu"):
        assert "127.0.0.1:8000:8000" in compose["services"][name]["ports"]
    env = compose["services"]["vision"]["environment"]
    assert (env["HERO_VISION_HTTP_HOST"], env["HERO_VISION_HTTP_PORT"]) == ("0.0.0.0", "8000")
    envoy = yaml.safe_load(compose["configs"]["envoy"]["content"])["static_resources"]
    listener = next(x for x in envoy["listeners"] if x["name"] == "public-http-tls")
    assert listener["address"]["socket_address"]["port_value"] == 8443
    chain = listener["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["@type"].endswith("DownstreamTlsContext")
    cluster = next(c for c in envoy["clusters"] if c["name"] == "vision-http")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "vision", "port_value": 8000}

    _, docs = rendered
    (rayservice,) = by_kind(docs, "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    service = rayservice["spec"]["serveService"]
    assert service_ports(service)[8000] == config["http_options"]["port"] == 8000
    ingress = next(d for d in by_kind(docs, "Ingress")
                   if d["metadata"]["name"] == "hero-vision-http")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # events stream
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/v1" and ingress["spec"]["tls"][0]["secretName"]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"],
                                          "port": {"number": 8000}}
    bound = VisionConfig.model_validate(config["applications"][0]["args"]).max_http_body_bytes
    body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert bound <= int(body[:-1]) << 20 < bound + (1 << 20)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy"
                  and d["metadata"]["name"] == "hero-vision-ingress")
    public = [r for r in policy["spec"]["ingress"]
              if any(p["port"] == 8000 for p in r.get("ports", []))]
    assert public and all(r.get("from") for r in public)
    assert any(peer.get("podSelector", {}).get("matchLabels") == {"hero-serve/client": "true"}
               for r in public for peer in r["from"])
