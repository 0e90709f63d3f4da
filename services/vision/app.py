"""The vision service's Ray Serve application.

`serve_config.yaml` in this folder is the deployment's single source (also the
`serveConfigV2` of the KubeRay RayService): its `args`, with each process's
`HERO_VISION_*` environment over them, become `VisionConfig`; its `deployments` set each
deployment's replicas, autoscaling and resources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from services.vision.config import VisionConfig
from services.vision.encoder import Encoder
from services.vision.ingress import VisionIngress

EncoderDeployment = serve.deployment(name="Encoder")(Encoder)
IngressDeployment = serve.deployment(name="VisionIngress")(VisionIngress)


def build_app(args: dict[str, Any],
              deployments: Sequence[Mapping[str, Any]] = ()) -> Application:
    """Application builder: `import_path: services.vision.app:build_app`. `deployments`:
    per-deployment settings of a Serve config (`name` plus `.options()` fields) when the
    app is run from Python rather than deployed from the config by Serve or KubeRay."""
    # A bad value, no API tokens without allow_unauthenticated, or a Redis cache without
    # its secret (unless cache.allow_unsigned) fails the deploy here rather than in a
    # replica (each replica checks its own environment again).
    settings = VisionConfig.load(values=args)
    settings.bearer_tokens()
    settings.require_cache_secret()
    # The args travel as given; each replica loads them with its own environment, so
    # secrets never ride in the deployments' arguments.
    config = dict(args)
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}
    encoder = EncoderDeployment.options(**options.get("Encoder", {})).bind(config)
    return IngressDeployment.options(**options.get("VisionIngress", {})).bind(encoder, config)
