"""Shared helpers of the deploy tests: repository paths, and the chart rendered by the real
Helm engine (helm-python-sdk binds Helm's Go SDK; no helm binary, no cluster)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "tenantsync"
DASHBOARDS = ROOT / "dashboards"
RELEASE = "ts"
NAMESPACE = "sync"
# The newest Kubernetes whose schemas kubernetes-validate ships (1.37 with the pinned version).
KUBE_VERSION = kubernetes_validate.latest_version()

# Secret-carrying env vars: always valueFrom.secretKeyRef, never a literal value.
SECRET_ENV = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "TENANTSYNC_MASTER_KEY")


class Rendered:
    """The manifests of one render, parsed."""

    def __init__(self, manifests: dict[str, str]):
        self.text = manifests
        self.docs: list[dict[str, Any]] = []
        for path, body in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(body):
                if doc:
                    doc.setdefault("__template__", path)
                    self.docs.append(doc)

    def objects(self) -> list[dict[str, Any]]:
        """Docs without the bookkeeping key, as Kubernetes would receive them."""
        return [{k: v for k, v in d.items() if k != "__template__"} for d in self.docs]

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.kinds(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {len(found)}"
        return found[0]

    def deployment(self, role: str) -> dict[str, Any]:
        return self.one("Deployment", f"-{role}")

    def all_text(self) -> str:
        return "\n".join(self.text.values())


@pytest.fixture(scope="session")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart):
    """render(values) → Rendered, as `helm template ts deploy/helm/tenantsync -n sync` would."""

    def _render(values: dict[str, Any] | None = None) -> Rendered:
        return Rendered(
            chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        )

    return _render


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return helm_python.lint(
        CHART, values or {}, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def promtool() -> str | None:
    """Path of promtool, or None; TENANTSYNC_REQUIRE_PROMTOOL=1 turns a missing one into a failure."""
    path = shutil.which("promtool")
    if path is None and os.environ.get("TENANTSYNC_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool is required (TENANTSYNC_REQUIRE_PROMTOOL=1) but not on PATH")
    return path
