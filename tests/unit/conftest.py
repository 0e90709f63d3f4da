"""The rendered Kubernetes manifests, one overlay at a time, for the deployment tests."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.unit.deploy_support import OVERLAYS, kubectl


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / request.param)],
                         capture_output=True, text=True, check=True)
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]

