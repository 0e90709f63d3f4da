"""The vision service's Ray Serve application.

`serve_config.yaml` in this folder is the deployment's single source (also the
`serveConfigV2` of the KubeRay RayService): its `args` become `VisionConfig`, its
`deployments` set each deployment's replicas, autoscaling and resources.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from services.vision.config import VisionConfig
from services.vision.encoder import Encoder
from services.vision.ingress import VisionIngress

EncoderDeployment = serve.deployment(name="Encoder")(Encoder)
IngressDeployment = serve.deployment(name="VisionIngress")(VisionIngress)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: `import_path: services.vision.app:build_app`."""
    config = VisionConfig.model_validate(args).model_dump(mode="json")
    return IngressDeployment.bind(EncoderDeployment.bind(config), config)
