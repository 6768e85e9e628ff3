"""The Helm chart, rendered by the real Helm engine and checked against Kubernetes' schemas."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from conftest import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    SECRET_ENV,
    env_of,
    lint,
    pod_spec,
)

FULLNAME = f"{RELEASE}-tenantsync"

# Custom resources: kubernetes-validate ships schemas for built-in kinds only, so these are
# checked by the dedicated tests below (test_service_monitor, test_keda_scaled_object) instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),  # prometheus-operator
    ("keda.sh/v1alpha1", "ScaledObject"),  # KEDA
}

# Value sets every structural test runs over: defaults plus each optional feature.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hpa": {"worker": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}}},
    "keda+servicemonitor": {
        "worker": {"autoscaling": {"keda": {"enabled": True}}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "everything-set": {
        "image": {"repository": "registry.example/tenantsync", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"create": False, "name": "tenantsync-runner"},
        "secrets": {
            "existingSecret": "tenantsync-env",
            "masterKey": {"name": "tenantsync-master-key", "key": "key"},
        },
        "config": {"log": "tenantsync=debug,info", "logFormat": "text", "leaseTtlMs": 15000,
                   "bigqueryEmulatorHost": "http://bigquery-emulator:9050"},
        "extraEnv": [{"name": "TENANTSYNC_MAX_ATTEMPTS", "value": "8"}],
        "impersonator": {"secretName": "tenantsync-deploy-key"},
        "metrics": {"port": 9100},
        "shutdown": {"graceSeconds": 55, "marginSeconds": 20},
        "coordinator": {
            "replicas": 3,
            "podAnnotations": {"example.com/team": "data"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync",
                             "effect": "NoSchedule"}],
            "priorityClassName": "high",
            "pdb": {"minAvailable": 2},
        },
        "worker": {
            "replicas": 7,
            "concurrency": 8,
            "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "worker"}},
            }],
            "pdb": {"maxUnavailable": "25%"},
        },
        "migrations": {"backoffLimit": 1, "ttlSecondsAfterFinished": 60},
        "service": {"annotations": {"example.com/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "15s"},
    },
    "no-pdb-no-migrations": {
        "coordinator": {"pdb": {"enabled": False}},
        "worker": {"pdb": {"enabled": False}},
        "migrations": {"enabled": False},
    },
}

SENTINEL = "SENTINEL-DO-NOT-RENDER"


def container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1
    return containers[0]


# ------------------------------------------------------------------ engine and schemas


def test_helm_engine_is_the_real_one():
    # The bundled library is Helm's own Go SDK, not a reimplementation of its templating.
    assert helm_python.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_is_clean(scenario):
    report = lint(SCENARIOS[scenario])
    assert report["errors"] == []
    # strict lint: warnings count too; only "info" (e.g. "icon is recommended") may remain
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate_against_kubernetes_schemas(render, scenario):
    rendered = render(SCENARIOS[scenario])
    checked = 0
    for obj in rendered.objects():
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        # strict: unknown fields are errors, as the API server's field validation would make them
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 5


def test_rendered_kinds(render):
    kinds = sorted(d["kind"] for d in render({}).docs)
    assert kinds == sorted([
        "Deployment", "Deployment", "Service", "Service",
        "PodDisruptionBudget", "PodDisruptionBudget", "Job", "ServiceAccount",
    ])


def test_every_object_has_standard_labels_and_namespace(render):
    for obj in render(SCENARIOS["everything-set"]).docs + render(SCENARIOS["hpa"]).docs:
        labels = obj["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                    "helm.sh/chart"):
            assert key in labels, (obj["kind"], key)
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert obj["metadata"]["namespace"] == NAMESPACE


# ------------------------------------------------------------------ roles and replicas


def test_roles_run_their_subcommand(render):
    r = render({})
    assert container(r.deployment("coordinator"))["args"] == ["coordinator"]
    assert container(r.deployment("worker"))["args"] == ["worker"]
    assert container(r.one("Job"))["args"] == ["migrate"]


def test_coordinator_has_two_replicas_by_default(render):
    assert render({}).deployment("coordinator")["spec"]["replicas"] == 2


@pytest.mark.parametrize("replicas", [0, 1, 5, 40])
def test_worker_replicas_follow_values(render, replicas):
    r = render({"worker": {"replicas": replicas}})
    assert r.deployment("worker")["spec"]["replicas"] == replicas
    assert r.kinds("HorizontalPodAutoscaler") == []
    # scaling workers leaves coordinators alone
    assert r.deployment("coordinator")["spec"]["replicas"] == 2


def test_hpa_owns_worker_replicas_when_enabled(render):
    r = render({"worker": {"replicas": 5, "autoscaling": {
        "enabled": True, "minReplicas": 3, "maxReplicas": 12, "targetCPUUtilizationPercentage": 60}}})
    worker = r.deployment("worker")
    # a replicas field would fight the HPA on every `helm upgrade`
    assert "replicas" not in worker["spec"]
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["maxReplicas"] == 12
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": worker["metadata"]["name"]}
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert r.kinds("ScaledObject") == []
    assert r.deployment("coordinator")["spec"]["replicas"] == 2


def test_hpa_refuses_max_below_min(chart):
    with pytest.raises(helm_python.HelmError, match="maxReplicas"):
        chart.render({"worker": {"autoscaling": {"enabled": True, "minReplicas": 5,
                                                 "maxReplicas": 2}}}, name=RELEASE)


def test_keda_scaled_object(render):
    r = render({"worker": {"autoscaling": {"minReplicas": 2, "maxReplicas": 30, "keda": {
        "enabled": True, "queueDepthPerReplica": 50}}}})
    worker = r.deployment("worker")
    assert "replicas" not in worker["spec"]
    # KEDA manages its own HPA: a second one from the chart would conflict
    assert r.kinds("HorizontalPodAutoscaler") == []
    so = r.one("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 2
    assert so["spec"]["maxReplicaCount"] == 30
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert set(triggers) == {"cpu", "prometheus"}
    prom = triggers["prometheus"]["metadata"]
    assert "tenantsync_queue_depth" in prom["query"]
    assert f'namespace="{NAMESPACE}"' in prom["query"]
    assert prom["threshold"] == "50"
    assert prom["serverAddress"].startswith("http")


# ------------------------------------------------------------------ pods


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_deployments_have_liveness_and_readiness_probes(render, scenario):
    values = SCENARIOS[scenario]
    port = values.get("metrics", {}).get("port", 9464)
    for role in ("coordinator", "worker"):
        c = container(render(values).deployment(role))
        [declared] = c["ports"]
        assert declared == {"name": "metrics", "containerPort": port, "protocol": "TCP"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert env_of(c)["TENANTSYNC_METRICS_ADDR"]["value"] == f"0.0.0.0:{port}"


def test_job_has_no_probes(render):
    c = container(render({}).one("Job"))
    assert "livenessProbe" not in c and "readinessProbe" not in c


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_non_root_and_locked_down(render, scenario):
    r = render(SCENARIOS[scenario])
    pods = r.kinds("Deployment") + r.kinds("Job")
    assert pods
    for obj in pods:
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["runAsUser"] == 10001
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "requests" in c["resources"] and "limits" in c["resources"]


@pytest.mark.parametrize("grace", [25, 60])
def test_termination_grace_outlasts_shutdown_grace(render, grace):
    r = render({"shutdown": {"graceSeconds": grace}})
    for role in ("coordinator", "worker"):
        d = r.deployment(role)
        drain_ms = int(env_of(container(d))["TENANTSYNC_SHUTDOWN_GRACE_MS"]["value"])
        assert drain_ms == grace * 1000
        assert pod_spec(d)["terminationGracePeriodSeconds"] > drain_ms / 1000


def test_worker_settings_reach_the_environment(render):
    r = render(SCENARIOS["everything-set"])
    worker_env = env_of(container(r.deployment("worker")))
    coordinator_env = env_of(container(r.deployment("coordinator")))
    assert worker_env["TENANTSYNC_CONCURRENCY"]["value"] == "8"
    assert "TENANTSYNC_CONCURRENCY" not in coordinator_env
    for env in (worker_env, coordinator_env):
        assert env["TENANTSYNC_LEASE_TTL_MS"]["value"] == "15000"
        assert env["TENANTSYNC_LOG"]["value"] == "tenantsync=debug,info"
        assert env["TENANTSYNC_LOG_FORMAT"]["value"] == "text"
        assert env["BIGQUERY_EMULATOR_HOST"]["value"] == "http://bigquery-emulator:9050"
        assert env["TENANTSYNC_MAX_ATTEMPTS"]["value"] == "8"
    # unset values keep the binary's defaults: no variable at all
    default_env = env_of(container(render({}).deployment("worker")))
    for name in ("TENANTSYNC_CONCURRENCY", "TENANTSYNC_LEASE_TTL_MS", "BIGQUERY_EMULATOR_HOST"):
        assert name not in default_env


def test_impersonator_key_is_mounted_from_its_secret_only_when_named(render):
    r = render({"impersonator": {"secretName": "tenantsync-deploy-key", "key": "sa.json",
                                 "iamCredentialsUrl": "https://iam.example"}})
    for role in ("coordinator", "worker"):
        d = r.deployment(role)
        c = container(d)
        env = env_of(c)
        path = "/var/run/secrets/tenantsync/impersonator/sa.json"
        assert env["TENANTSYNC_IMPERSONATOR_KEY_FILE"]["value"] == path
        assert env["TENANTSYNC_IAM_CREDENTIALS_URL"]["value"] == "https://iam.example"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["impersonator"]["readOnly"] is True
        assert path.startswith(mounts["impersonator"]["mountPath"])
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["impersonator"]["secret"]
        assert secret["secretName"] == "tenantsync-deploy-key"
        assert secret["items"] == [{"key": "sa.json", "path": "sa.json"}]
    d = render({}).deployment("worker")
    assert "TENANTSYNC_IMPERSONATOR_KEY_FILE" not in env_of(container(d))
    assert all(v["name"] != "impersonator" for v in d["spec"]["template"]["spec"]["volumes"])


def test_image_reference(render):
    c = container(render({}).deployment("worker"))
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert c["image"] == f"tenantsync:{chart_meta['appVersion']}"
    c = container(render({"image": {"repository": "r.example/ts", "tag": "1.2.3"}}).deployment("worker"))
    assert c["image"] == "r.example/ts:1.2.3"
    digest = "sha256:" + "b" * 64
    c = container(render({"image": {"repository": "r.example/ts", "tag": "1.2.3",
                                    "digest": digest}}).deployment("worker"))
    assert c["image"] == f"r.example/ts@{digest}"


# ------------------------------------------------------------------ migrations


def test_migrations_run_as_pre_install_and_pre_upgrade_hook(render):
    job = render({}).one("Job")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"pre-install", "pre-upgrade"}
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    # the hook runs before the chart's ServiceAccount exists
    assert "serviceAccountName" not in spec
    # migrate needs the control plane only: no other secret is mounted into it
    env = env_of(container(job))
    assert set(env) & set(SECRET_ENV) == {"DATABASE_URL"}


def test_migrations_can_be_disabled(render):
    assert render({"migrations": {"enabled": False}}).kinds("Job") == []


# ------------------------------------------------------------------ secrets by reference


def secret_refs(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = env_of(container(obj))
    refs = {}
    for name in SECRET_ENV:
        if name not in env:
            continue
        entry = env[name]
        assert "value" not in entry, f"{name} has a literal value"
        refs[name] = entry["valueFrom"]["secretKeyRef"]
    return refs


def test_secrets_come_from_secret_key_refs(render):
    r = render({"secrets": {
        "databaseUrl": {"name": "pg-control", "key": "url"},
        "sourceDatabaseUrl": {"name": "pg-source", "key": "url", "optional": False},
        "redisUrl": {"name": "redis", "key": "url"},
        "masterKey": {"name": "tenantsync-master-key", "key": "key"},
    }})
    expected = {
        "DATABASE_URL": {"name": "pg-control", "key": "url"},
        "SOURCE_DATABASE_URL": {"name": "pg-source", "key": "url"},
        "REDIS_URL": {"name": "redis", "key": "url"},
        "TENANTSYNC_MASTER_KEY": {"name": "tenantsync-master-key", "key": "key"},
    }
    for role in ("coordinator", "worker"):
        assert secret_refs(r.deployment(role)) == expected
    assert secret_refs(r.one("Job")) == {"DATABASE_URL": expected["DATABASE_URL"]}


def test_secret_name_fallbacks(render):
    # per-reference name > secrets.existingSecret > the release's full name
    r = render({"secrets": {"existingSecret": "tenantsync-env",
                            "masterKey": {"name": "kms-key"}}})
    refs = secret_refs(r.deployment("worker"))
    assert refs["DATABASE_URL"] == {"name": "tenantsync-env", "key": "DATABASE_URL"}
    assert refs["TENANTSYNC_MASTER_KEY"] == {"name": "kms-key", "key": "TENANTSYNC_MASTER_KEY"}
    # SOURCE_DATABASE_URL may be absent: the binary then reads the control-plane database
    assert refs["SOURCE_DATABASE_URL"] == {
        "name": "tenantsync-env", "key": "SOURCE_DATABASE_URL", "optional": True}
    refs = secret_refs(render({}).deployment("coordinator"))
    assert {ref["name"] for ref in refs.values()} == {FULLNAME}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_never_creates_secrets(render, scenario):
    r = render(SCENARIOS[scenario])
    assert r.kinds("Secret") == [] and r.kinds("ConfigMap") == []
    for obj in r.kinds("Deployment") + r.kinds("Job"):
        secret_refs(obj)  # asserts no literal value on any secret variable


# Every way someone might try to hand the chart a secret value. values.schema.json has no field
# that could hold one, so each attempt must fail before any template runs.
LITERAL_SECRET_ATTEMPTS = {
    "value next to the reference": {"secrets": {"masterKey": {"value": SENTINEL}}},
    "reference replaced by a string": {"secrets": {"masterKey": SENTINEL}},
    "database url as a string": {"secrets": {"databaseUrl": f"postgres://u:{SENTINEL}@db/x"}},
    "top-level shortcut": {"masterKey": SENTINEL},
    "stringData-style map": {"secrets": {"redisUrl": {"key": "url", "stringData": SENTINEL}}},
    "config shortcut": {"config": {"masterKey": SENTINEL}},
    "extraEnv literal": {"extraEnv": [{"name": "TENANTSYNC_MASTER_KEY", "value": SENTINEL}]},
    "extraEnv override of a url": {"extraEnv": [{"name": "DATABASE_URL", "value": SENTINEL}]},
}


@pytest.mark.parametrize("attempt", LITERAL_SECRET_ATTEMPTS)
def test_schema_rejects_literal_secret_values(chart, attempt):
    values = LITERAL_SECRET_ATTEMPTS[attempt]
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "schema" in str(err.value)
    report = lint(values)
    assert report["errors"], "helm lint accepted a literal secret"
    # nothing was rendered, so the value cannot have leaked into a manifest
    assert SENTINEL not in str(err.value).split("\n")[0]


# ------------------------------------------------------------------ values.schema.json


@pytest.mark.parametrize("values, where", [
    ({"worker": {"replicas": "many"}}, "/worker/replicas"),
    ({"coordinator": {"replicas": 1.5}}, "/coordinator/replicas"),
    ({"worker": {"replicas": -1}}, "/worker/replicas"),
    ({"worker": {"resources": {"requests": {"cpu": "lots"}}}}, "/worker/resources/requests/cpu"),
    ({"worker": {"resources": {"request": {"cpu": "1"}}}}, "/worker/resources"),
    ({"worker": {"autoscaling": {"maxReplicas": "10"}}}, "/worker/autoscaling/maxReplicas"),
    ({"config": {"logFormat": "xml"}}, "/config/logFormat"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"replicas": 3}, "additional properties 'replicas'"),
    ({"wroker": {"replicas": 3}}, "additional properties 'wroker'"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.render(values, name=RELEASE)
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(values)
    assert lint(values)["errors"]


def test_default_values_satisfy_the_schema(chart):
    chart.validate_schema(chart.values)


# ------------------------------------------------------------------ services and monitoring


def test_metrics_service_per_role_selects_its_pods(render):
    r = render({})
    for role in ("coordinator", "worker"):
        svc = r.one("Service", f"-{role}")
        pod_labels = r.deployment(role)["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == role
        assert svc["spec"]["ports"] == [
            {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]


def test_pdb_per_role_selects_its_pods(render):
    r = render({})
    coordinator_pdb = r.one("PodDisruptionBudget", "-coordinator")
    worker_pdb = r.one("PodDisruptionBudget", "-worker")
    assert coordinator_pdb["spec"]["minAvailable"] == 1
    assert worker_pdb["spec"]["maxUnavailable"] == 1
    for role, pdb in (("coordinator", coordinator_pdb), ("worker", worker_pdb)):
        pod_labels = r.deployment(role)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_service_monitor(render):
    assert render({}).kinds("ServiceMonitor") == []
    r = render({"serviceMonitor": {"enabled": True, "interval": "15s",
                                   "labels": {"release": "kube-prometheus-stack"}}})
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    selected = [s for s in r.kinds("Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert sorted(s["metadata"]["name"] for s in selected) == [
        f"{FULLNAME}-coordinator", f"{FULLNAME}-worker"]


# ------------------------------------------------------------------ documentation


def value_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        # leaves, and free-form maps (annotations, resources, …) as a whole
        if isinstance(value, dict) and value and key != "resources":
            paths += value_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in value_paths(values) if f"`{p}`" not in readme]
    assert missing == []


def test_schema_types_every_value():
    import json
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], tree: dict[str, Any], prefix: str):
        props = node.get("properties", {})
        for key, value in tree.items():
            assert key in props, f"{prefix}{key} is not in values.schema.json"
            sub = props[key]
            while "$ref" in sub:
                sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and "properties" in sub:
                walk(sub, value, f"{prefix}{key}.")

    walk(schema, values, "")
