"""Contract tests of `raymoe deploy apply|status|delete|logs` against FakeKubeApi, a local HTTP
server that answers like the Kubernetes API for exactly the calls the client makes (and fails the
test on any other call). No real API server runs here; see fake_kube_api.py for what is modelled.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest
import yaml

from raymoe.deploy.deploy_cli import add_deploy_command
from raymoe.deploy.kube_client import explain_api_error
from raymoe.deploy.kube_manifests import load_manifests
from raymoe.deploy.kube_status import FAILED, PROGRESSING, READY, SUSPENDED, readiness
from tests.unit.fake_kube_api import ALL_CRDS, FakeKubeApi

RAYCLUSTER = """\
apiVersion: ray.io/v1
kind: RayCluster
metadata:
  name: raymoe
  labels: {app.kubernetes.io/name: raymoe}
spec:
  rayVersion: "2.55.0"
  headGroupSpec:
    rayStartParams: {}
    template:
      spec:
        containers:
          - {name: ray-head, image: "rayproject/ray:2.55.0"}
  workerGroupSpecs:
    - groupName: cpu
      replicas: 2
      rayStartParams: {}
      template:
        spec:
          containers:
            - {name: ray-worker, image: "rayproject/ray:2.55.0"}
"""
RAYSERVICE = """\
apiVersion: ray.io/v1
kind: RayService
metadata:
  name: raymoe-serve
spec:
  serveConfigV2: |
    applications:
      - name: llm
        import_path: pipelines.serve:app
  rayClusterConfig:
    rayVersion: "2.55.0"
    headGroupSpec:
      rayStartParams: {}
      template:
        spec:
          containers:
            - {name: ray-head, image: "rayproject/ray:2.55.0"}
"""
CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: raymoe-config
data:
  serve.yaml: "model: debug\\n"
"""
NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: raymoe
  labels: {pod-security.kubernetes.io/enforce: restricted}
"""
# The Namespace objects a FakeKubeApi starts with.
STARTING_NAMESPACES = {("namespaces", "", "raymoe"), ("namespaces", "", "default")}


@pytest.fixture
def kube():
    fake = FakeKubeApi()
    yield fake
    fake.close()
    assert fake.violations == [], "the client made calls a Kubernetes API server would not expect"


@pytest.fixture
def manifests(tmp_path):
    """A manifest directory like k8s/: one resource per file."""
    root = tmp_path / "k8s"
    root.mkdir()
    for name, text in [
        ("raycluster.yaml", RAYCLUSTER),
        ("rayservice.serve.yaml", RAYSERVICE),
        ("configmap.yaml", CONFIGMAP),
    ]:
        (root / name).write_text(text)
    return root


def deploy(kube_or_config, tmp_path, *argv):
    """Runs `raymoe deploy ARGV --kubeconfig ...` as the CLI would; returns the exit code."""
    parser = argparse.ArgumentParser(prog="raymoe")
    add_deploy_command(parser.add_subparsers(dest="command", required=True))
    config = (
        kube_or_config
        if not isinstance(kube_or_config, FakeKubeApi)
        else kube_or_config.kubeconfig(tmp_path / "kubeconfig")
    )
    args = parser.parse_args(["deploy", *argv, "--kubeconfig", str(config)])
    return args.func(args)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


RAYCLUSTER_READY = {
    "state": "ready",
    "observedGeneration": 1,
    "readyWorkerReplicas": 2,
    "desiredWorkerReplicas": 2,
    "conditions": [
        {"type": "RayClusterProvisioned", "status": "True", "reason": "AllPodRunningAndReadyFirstTime"},
        {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
    ],
}
RAYSERVICE_READY = {
    "observedGeneration": 1,
    "numServeEndpoints": 1,
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"},
        {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"},
    ],
}


# ---- apply ----


def test_apply_creates_then_a_second_apply_changes_nothing(kube, manifests, tmp_path, capsys):
    # Execute
    first = deploy(kube, tmp_path, "apply", str(manifests))
    out_first = capsys.readouterr().out
    after_first = {k: (o["metadata"]["resourceVersion"], o["metadata"]["generation"]) for k, o in kube.objects.items()}
    second = deploy(kube, tmp_path, "apply", str(manifests))
    out_second = capsys.readouterr().out

    # Assert
    assert first == 0 and second == 0
    assert set(kube.objects) == STARTING_NAMESPACES | {
        ("configmaps", "raymoe", "raymoe-config"),
        ("rayclusters", "raymoe", "raymoe"),
        ("rayservices", "raymoe", "raymoe-serve"),
    }
    # Config before the workloads, whatever the file names sort to.
    patches = [path for _, path, _ in kube.calls("PATCH")]
    assert patches[:3] == [
        "/api/v1/namespaces/raymoe/configmaps/raymoe-config",
        "/apis/ray.io/v1/namespaces/raymoe/rayclusters/raymoe",
        "/apis/ray.io/v1/namespaces/raymoe/rayservices/raymoe-serve",
    ]
    assert all(q == {"fieldManager": "raymoe"} for _, _, q in kube.calls("PATCH"))
    assert out_first.count(" created ") == 3
    cluster = kube.objects[("rayclusters", "raymoe", "raymoe")]
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert [(e["manager"], e["operation"]) for e in cluster["metadata"]["managedFields"]] == [("raymoe", "Apply")]
    # The second apply is a no-op: same resourceVersion and generation everywhere.
    assert out_second.count(" unchanged ") == 3
    assert {
        k: (o["metadata"]["resourceVersion"], o["metadata"]["generation"]) for k, o in kube.objects.items()
    } == after_first
    assert len(kube.calls("PATCH")) == 6


def test_apply_of_a_changed_spec_configures_only_that_object(kube, manifests, tmp_path, capsys):
    # Prepare
    deploy(kube, tmp_path, "apply", str(manifests))
    (manifests / "raycluster.yaml").write_text(RAYCLUSTER.replace("replicas: 2", "replicas: 4"))
    capsys.readouterr()

    # Execute
    code = deploy(kube, tmp_path, "apply", str(manifests))

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "RayCluster/raymoe configured" in out and out.count(" unchanged ") == 2
    cluster = kube.objects[("rayclusters", "raymoe", "raymoe")]
    assert cluster["metadata"]["generation"] == 2
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 4


def test_apply_conflict_with_another_manager_needs_force_conflicts(kube, manifests, tmp_path, capsys):
    # Prepare: someone created the ConfigMap with kubectl, with other data.
    kube.seed(
        "configmaps",
        "raymoe",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "raymoe-config"}, "data": {"serve.yaml": "old"}},
    )

    # Execute
    refused = deploy(kube, tmp_path, "apply", str(manifests / "configmap.yaml"))
    err = capsys.readouterr().err
    forced = deploy(kube, tmp_path, "apply", str(manifests / "configmap.yaml"), "--force-conflicts")

    # Assert
    assert refused == 2
    assert "ConfigMap/raymoe-config: apply conflicts with another field manager on .data" in err
    assert "--force-conflicts" in err
    assert forced == 0
    assert kube.calls("PATCH")[-1][2] == {"fieldManager": "raymoe", "force": "true"}
    stored = kube.objects[("configmaps", "raymoe", "raymoe-config")]
    assert stored["data"] == {"serve.yaml": "model: debug\n"}
    assert [e["manager"] for e in stored["metadata"]["managedFields"]] == ["raymoe"]


def test_a_namespace_is_applied_first_at_the_cluster_scope_and_deleted_last(manifests, tmp_path, capsys):
    # Prepare: a cluster with only `default`; the manifests bring their namespace.
    (manifests / "zz-namespace.yaml").write_text(NAMESPACE)
    kube = FakeKubeApi(namespaces=("default",))
    try:
        # Execute
        applied = deploy(kube, tmp_path, "apply", str(manifests), "-n", "raymoe")
        out = capsys.readouterr().out
        stored = kube.objects[("namespaces", "", "raymoe")]
        kube.add_pod("raymoe", "raymoe-head-x", {"ray.io/cluster": "raymoe"})  # made by the operator
        deleted = deploy(kube, tmp_path, "delete", str(manifests), "--interval", "0.01")
    finally:
        kube.close()

    # Assert
    assert (applied, deleted) == (0, 0), capsys.readouterr().err
    assert kube.calls("PATCH")[0][1] == "/api/v1/namespaces/raymoe"  # whatever the file names sort to
    assert "Namespace/raymoe created (cluster-scoped, resourceVersion" in out
    assert "namespace" not in stored["metadata"]
    assert stored["metadata"]["labels"] == {"pod-security.kubernetes.io/enforce": "restricted"}
    assert kube.calls("DELETE")[-1][1] == "/api/v1/namespaces/raymoe"
    # The pod nobody deleted went with its namespace.
    assert set(kube.objects) == {("namespaces", "", "default")} and kube.violations == []


def test_creating_a_namespace_needs_a_cluster_role(kube, tmp_path, capsys):
    (tmp_path / "namespace.yaml").write_text(NAMESPACE.replace("name: raymoe", "name: raymoe-dev"))
    kube.forbid("create", "namespaces")

    assert deploy(kube, tmp_path, "apply", str(tmp_path / "namespace.yaml")) == 2
    assert capsys.readouterr().err.strip() == (
        "raymoe deploy apply: Namespace/raymoe-dev: service account raymoe-deployer cannot create namespaces "
        "at the cluster scope: ask a cluster admin for a ClusterRole that allows it"
    )


# ---- which files a path means ----


def test_a_kustomization_dir_applies_exactly_its_resources_in_its_namespace(kube, manifests, tmp_path, capsys):
    # Prepare: rayservice.serve.yaml and jobs/ are in the directory but not listed.
    (manifests / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: default\n"
        "resources:\n  - raycluster.yaml\n  - configmap.yaml\n"
    )
    (manifests / "jobs").mkdir()
    (manifests / "jobs" / "rayjob.train.yaml").write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: train}\nspec: {entrypoint: x}\n"
    )

    # Execute
    code = deploy(kube, tmp_path, "apply", str(manifests))

    # Assert: the kustomization's namespace, not the context's (raymoe).
    assert code == 0, capsys.readouterr().err
    assert set(kube.objects) - STARTING_NAMESPACES == {
        ("configmaps", "default", "raymoe-config"),
        ("rayclusters", "default", "raymoe"),
    }


@pytest.mark.parametrize(
    "kustomization, expected",
    [
        (
            "resources: [configmap.yaml]\npatches:\n  - path: configmap.patch.yaml\n",
            "{d} is a kustomize overlay: apply it with `kubectl apply --server-side -k {d}`",
        ),
        (
            "resources: [configmap.yaml]\nnamePrefix: dev-\n",
            "{d}/kustomization.yaml uses namePrefix: only kustomize renders that; apply it with "
            "`kubectl apply --server-side -k {d}`",
        ),
        (
            "resources: [configmap.yaml, missing.yaml]\n",
            "{d}/kustomization.yaml: resource 'missing.yaml' is not a file in {d}",
        ),
        (
            "resources: [../outside.yaml]\n",
            "{d}/kustomization.yaml: resource '../outside.yaml' is outside {d} (kustomize refuses it too)",
        ),
    ],
)
def test_kustomizations_raymoe_deploy_cannot_render_are_refused(
    kube, manifests, tmp_path, capsys, kustomization, expected
):
    (manifests / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + kustomization
    )
    (tmp_path / "outside.yaml").write_text(CONFIGMAP)

    assert deploy(kube, tmp_path, "apply", str(manifests)) == 2
    assert capsys.readouterr().err.strip() == f"raymoe deploy apply: {expected.format(d=manifests)}"
    assert kube.requests == []


def test_a_kustomization_inside_a_plain_dir_or_named_as_a_file_is_refused(kube, manifests, tmp_path, capsys):
    # Prepare
    base = manifests / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text("kind: Kustomization\nresources: []\n")

    # Execute
    whole = deploy(kube, tmp_path, "apply", str(manifests))
    whole_err = capsys.readouterr().err.strip()
    as_file = deploy(kube, tmp_path, "apply", str(base / "kustomization.yaml"))
    as_file_err = capsys.readouterr().err.strip()

    # Assert
    assert (whole, as_file) == (2, 2)
    assert whole_err == (
        f"raymoe deploy apply: {base} holds a kustomization: apply it on its own "
        f"(`raymoe deploy apply {base}`), not as part of {manifests}"
    )
    assert as_file_err == (
        f"raymoe deploy apply: {base / 'kustomization.yaml'} is a kustomization, not a "
        f"Kubernetes object: apply its directory (`raymoe deploy apply {base}`)"
    )
    assert kube.requests == []


REPO_K8S = Path(__file__).resolve().parents[2] / "k8s"
needs_rendered_k8s = pytest.mark.skipif(
    not (REPO_K8S / "base" / "kustomization.yaml").is_file(), reason="k8s/ is not rendered yet"
)


@needs_rendered_k8s
def test_the_rendered_k8s_dir_applies_then_reapplies_unchanged_then_deletes(tmp_path, capsys):
    # Prepare: a cluster with only `default`; k8s/base brings its own namespace.
    base = REPO_K8S / "base"
    objects = load_manifests([base])
    kube = FakeKubeApi(namespaces=("default",))
    try:
        # Execute
        codes = [deploy(kube, tmp_path, "apply", str(base))]
        first = capsys.readouterr().out
        codes.append(deploy(kube, tmp_path, "apply", str(base)))
        second = capsys.readouterr().out
        codes.append(deploy(kube, tmp_path, "delete", str(base), "--interval", "0.01"))
    finally:
        kube.close()

    # Assert: exactly the kustomization's resources (one object each), none of jobs/.
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    assert codes == [0, 0, 0], capsys.readouterr().err
    assert sorted(Path(m.source).name for m in objects) == sorted(listed)
    assert objects[0].ref == "Namespace/raymoe"
    assert first.count(" created ") == len(objects) and second.count(" unchanged ") == len(objects)
    assert set(kube.objects) == {("namespaces", "", "default")} and kube.violations == []


@needs_rendered_k8s
def test_a_rendered_rayjob_applies_on_its_own_after_the_base(tmp_path, capsys):
    # Prepare: the base applied; the "operator" starts the job after two reads.
    kube = FakeKubeApi(namespaces=("default",))
    try:
        assert deploy(kube, tmp_path, "apply", str(REPO_K8S / "base")) == 0
        base_objects = set(kube.objects)
        kube.set_status(
            "rayjobs",
            "raymoe",
            "raymoe-ingest",
            {"observedGeneration": 1, "jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            after_gets=2,
        )
        capsys.readouterr()

        # Execute
        code = deploy(
            kube,
            tmp_path,
            "apply",
            str(REPO_K8S / "base" / "jobs" / "rayjob.ingest.yaml"),
            "--wait",
            "--interval",
            "0.01",
            "--timeout",
            "30",
        )
        out = capsys.readouterr().out
    finally:
        kube.close()

    # Assert: one object more, nothing else touched.
    assert code == 0, capsys.readouterr().err
    assert set(kube.objects) - base_objects == {("rayjobs", "raymoe", "raymoe-ingest")}
    assert out.splitlines()[1].startswith("RayJob/raymoe-ingest created (namespace raymoe, ")
    assert "all 1 objects ready" in out and kube.violations == []


@needs_rendered_k8s
def test_a_rendered_overlay_is_refused_with_the_kubectl_command(kube, tmp_path, capsys):
    overlay = REPO_K8S / "overlays" / "cpu-dev"

    code = deploy(kube, tmp_path, "apply", str(overlay))

    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"raymoe deploy apply: {overlay} is a kustomize overlay: apply it with `kubectl apply --server-side -k "
        f"{overlay}`, or apply its base with `raymoe deploy apply {REPO_K8S / 'base'}`"
    )
    assert kube.requests == []


# ---- status and waiting ----


def test_status_prints_readiness_from_conditions(kube, manifests, tmp_path, capsys):
    # Prepare
    deploy(kube, tmp_path, "apply", str(manifests))
    kube.set_status("rayclusters", "raymoe", "raymoe", RAYCLUSTER_READY)
    kube.set_status(
        "rayservices",
        "raymoe",
        "raymoe-serve",
        {
            "observedGeneration": 1,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "Initializing"},
                {"type": "UpgradeInProgress", "status": "False", "reason": "NoActiveCluster"},
            ],
        },
    )
    capsys.readouterr()

    # Execute
    code = deploy(kube, tmp_path, "status", str(manifests))

    # Assert
    rows = {line.split()[0]: line.split(None, 3)[2:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert code == 0
    assert rows["ConfigMap/raymoe-config"] == ["ready", "exists"]
    assert rows["RayCluster/raymoe"] == [
        "ready",
        "state=ready RayClusterProvisioned=True HeadPodReady=True workers=2/2",
    ]
    assert rows["RayService/raymoe-serve"] == [
        "progressing",
        "Ready=False (Initializing) UpgradeInProgress=False (NoActiveCluster)",
    ]


def test_apply_wait_follows_status_until_ready(kube, manifests, tmp_path, capsys):
    # Prepare: the "operator" writes ready statuses only after a few reads.
    deploy(kube, tmp_path, "apply", str(manifests))
    kube.set_status(
        "rayclusters",
        "raymoe",
        "raymoe",
        {
            "state": "",
            "observedGeneration": 1,
            "conditions": [
                {"type": "RayClusterProvisioned", "status": "False", "reason": "RayClusterPodsProvisioning"}
            ],
        },
    )
    kube.set_status("rayclusters", "raymoe", "raymoe", RAYCLUSTER_READY, after_gets=3)
    kube.set_status("rayservices", "raymoe", "raymoe-serve", RAYSERVICE_READY, after_gets=5)
    capsys.readouterr()

    # Execute
    code = deploy(kube, tmp_path, "apply", str(manifests), "--wait", "--interval", "0.01", "--timeout", "30")

    # Assert
    captured = capsys.readouterr()
    assert code == 0
    cluster_reads = [c for c in kube.calls("GET") if c[1].endswith("/rayclusters/raymoe")]
    assert len(cluster_reads) >= 1 + 3  # the read before the apply, then the polls
    progress = captured.err.splitlines()
    assert "waiting for RayCluster/raymoe (progressing: state=- RayClusterProvisioned=False" in progress[0]
    assert "RayService/raymoe-serve (progressing: no status yet" in progress[0]
    assert progress[-1].endswith("3/3 ready")
    assert "all 3 objects ready" in captured.out


def test_apply_wait_gives_up_after_the_timeout(kube, manifests, tmp_path, capsys):
    code = deploy(
        kube, tmp_path, "apply", str(manifests / "raycluster.yaml"), "--wait", "--interval", "0.01", "--timeout", "0.1"
    )

    err = capsys.readouterr().err
    assert code == 1
    assert "RayCluster/raymoe not ready after 0.1s: no status yet (is the KubeRay operator running?)" in err


def test_apply_wait_stops_at_a_failed_rayjob(kube, tmp_path, capsys):
    # Prepare
    job = tmp_path / "rayjob.yaml"
    job.write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: train}\nspec: {entrypoint: python -m pipelines.train}\n"
    )
    deploy(kube, tmp_path, "apply", str(job))
    kube.set_status(
        "rayjobs",
        "raymoe",
        "train",
        {
            "observedGeneration": 1,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "message": "exit code 1",
        },
    )

    # Execute
    code = deploy(kube, tmp_path, "apply", str(job), "--wait", "--interval", "0.01", "--timeout", "30")

    # Assert
    assert code == 1
    assert (
        "RayJob/train is failed: jobDeploymentStatus=Failed jobStatus=FAILED: AppFailed: exit code 1"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "kind, status, expected",
    [
        ("RayCluster", {"state": "ready"}, (READY, "state=ready")),  # no conditions: the deprecated state
        (
            "RayCluster",
            {
                "conditions": [
                    {"type": "RayClusterProvisioned", "status": "True"},
                    {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound"},
                ]
            },
            (PROGRESSING, "state=- RayClusterProvisioned=True HeadPodReady=False (HeadPodNotFound)"),
        ),
        (
            "RayCluster",
            {
                "conditions": [
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreateHeadPod", "message": "quota"}
                ]
            },
            (FAILED, "state=- ReplicaFailure=True: FailedCreateHeadPod: quota"),
        ),
        (
            "RayService",
            {"conditions": [{"type": "Ready", "status": "True"}, {"type": "UpgradeInProgress", "status": "True"}]},
            (PROGRESSING, "Ready=True UpgradeInProgress=True"),
        ),  # the old cluster serves, the new spec is not live
        ("RayService", {"serviceStatus": "Running"}, (READY, "serviceStatus=Running")),
        (
            "RayJob",
            {"jobDeploymentStatus": "Initializing"},
            (PROGRESSING, "jobDeploymentStatus=Initializing jobStatus=-"),
        ),
        (
            "RayJob",
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            (READY, "jobDeploymentStatus=Running jobStatus=RUNNING"),
        ),
        (
            "RayJob",
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
            (READY, "jobDeploymentStatus=Complete jobStatus=SUCCEEDED"),
        ),
        (
            "RayJob",
            {"jobDeploymentStatus": "Suspended", "jobStatus": "STOPPED"},
            (SUSPENDED, "jobDeploymentStatus=Suspended jobStatus=STOPPED"),
        ),
    ],
)
def test_readiness_from_kuberay_status_fields(kind, status, expected):
    obj = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": "x", "generation": 1}, "status": status}
    got = readiness(obj)
    assert (got.state, got.detail) == expected


def test_a_status_older_than_the_spec_is_not_ready():
    obj = {
        "kind": "RayCluster",
        "metadata": {"name": "x", "generation": 3},
        "status": {**RAYCLUSTER_READY, "observedGeneration": 2},
    }
    assert readiness(obj).state == PROGRESSING
    assert readiness(obj).detail == "status is for generation 2, spec is generation 3"


# ---- delete ----


def test_delete_runs_in_reverse_order_in_the_foreground_and_waits_for_gone(kube, manifests, tmp_path, capsys):
    # Prepare
    deploy(kube, tmp_path, "apply", str(manifests))
    kube.delete_after_gets = 2  # finalizers keep each object readable for two more GETs
    capsys.readouterr()

    # Execute
    code = deploy(kube, tmp_path, "delete", str(manifests), "--interval", "0.01")
    out = capsys.readouterr().out
    again = deploy(kube, tmp_path, "delete", str(manifests))

    # Assert
    assert code == 0 and again == 0
    assert set(kube.objects) == STARTING_NAMESPACES
    deletes = kube.calls("DELETE")
    assert [path.rsplit("/", 2)[1] for _, path, _ in deletes[:3]] == ["rayservices", "rayclusters", "configmaps"]
    assert all(q == {"propagationPolicy": "Foreground"} for _, _, q in deletes)
    assert "all 3 objects deleted" in out
    assert capsys.readouterr().out.count("already gone") == 3


# ---- logs ----


def test_logs_print_the_head_pod_of_a_raycluster_and_of_a_rayjob(kube, tmp_path, capsys):
    # Prepare
    kube.add_pod(
        "raymoe",
        "raymoe-head-x",
        {"ray.io/cluster": "raymoe", "ray.io/node-type": "head"},
        log="started\nGCS ready\nserving\n",
    )
    kube.add_pod(
        "raymoe", "raymoe-worker-y", {"ray.io/cluster": "raymoe", "ray.io/node-type": "worker"}, log="worker\n"
    )
    kube.add_pod(
        "raymoe",
        "train-abc-head",
        {"ray.io/cluster": "train-abc", "ray.io/node-type": "head"},
        containers=("ray-head", "log-sidecar"),
        log="step 1 loss 3.2\n",
    )
    kube.seed(
        "rayjobs",
        "raymoe",
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "train"}, "spec": {}},
        manager="raymoe",
    )
    kube.set_status("rayjobs", "raymoe", "train", {"rayClusterName": "train-abc", "jobDeploymentStatus": "Running"})

    # Execute
    cluster = deploy(kube, tmp_path, "logs", "raycluster/raymoe", "--tail", "2")
    cluster_out = capsys.readouterr().out
    job = deploy(kube, tmp_path, "logs", "rayjob/train")
    job_out = capsys.readouterr().out

    # Assert
    assert (cluster, job) == (0, 0)
    assert cluster_out == "GCS ready\nserving\n"
    assert job_out == "step 1 loss 3.2\n"
    lists = [q for _, path, q in kube.calls("GET") if path.endswith("/pods")]
    assert lists == [
        {"labelSelector": "ray.io/cluster=raymoe,ray.io/node-type=head"},
        {"labelSelector": "ray.io/cluster=train-abc,ray.io/node-type=head"},
    ]
    assert [q["container"] for _, path, q in kube.calls("GET") if path.endswith("/log")] == ["ray-head", "ray-head"]


def test_logs_without_a_head_pod_say_so(kube, tmp_path, capsys):
    assert deploy(kube, tmp_path, "logs", "raycluster/raymoe") == 1
    assert "RayCluster/raymoe: no head pod in namespace raymoe" in capsys.readouterr().err


# ---- errors ----


def test_missing_kuberay_crd(manifests, tmp_path, capsys):
    kube = FakeKubeApi(crds=ALL_CRDS - {"rayclusters.ray.io", "rayservices.ray.io", "rayjobs.ray.io"})
    try:
        code = deploy(kube, tmp_path, "apply", str(manifests))
    finally:
        kube.close()
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "raymoe deploy apply: RayCluster/raymoe: KubeRay CRD "
        "rayclusters.ray.io not installed: install the KubeRay operator v1.7.0"
    )
    assert kube.violations == []


def test_rbac_denial_names_the_service_account(kube, manifests, tmp_path, capsys):
    kube.forbid("patch", "rayclusters")

    code = deploy(kube, tmp_path, "apply", str(manifests))

    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "raymoe deploy apply: RayCluster/raymoe: service account raymoe-deployer cannot patch rayclusters "
        "in namespace raymoe: check the Role in k8s/"
    )
    assert ("rayclusters", "raymoe", "raymoe") not in kube.objects


def test_an_apply_that_creates_needs_the_create_verb_too(kube, manifests, tmp_path, capsys):
    kube.forbid("create", "rayservices")

    assert deploy(kube, tmp_path, "apply", str(manifests)) == 2
    assert (
        "RayService/raymoe-serve: service account raymoe-deployer cannot create rayservices in namespace "
        "raymoe: check the Role in k8s/"
    ) in capsys.readouterr().err


def test_unreachable_api_server_names_the_url(kube, manifests, tmp_path, capsys):
    # Prepare: the current context points at a closed port; context `fake` at the server.
    url = f"http://127.0.0.1:{closed_port()}"
    config = yaml.safe_load(kube.kubeconfig(tmp_path / "kubeconfig").read_text())
    config["clusters"].append({"name": "dead", "cluster": {"server": url}})
    config["contexts"].append({"name": "dead", "context": {"cluster": "dead", "user": "deployer"}})
    config["current-context"] = "dead"
    (tmp_path / "two-contexts").write_text(yaml.safe_dump(config))

    # Execute
    dead = deploy(tmp_path / "two-contexts", tmp_path, "status", str(manifests))
    err = capsys.readouterr().err
    alive = deploy(tmp_path / "two-contexts", tmp_path, "status", str(manifests), "--context", "fake")

    # Assert
    assert dead == 1
    assert err.startswith(f"raymoe deploy status: cannot reach the Kubernetes API server at {url} (connection refused)")
    assert alive == 0


def test_spec_rejected_by_the_api_server_shows_the_field(kube, manifests, tmp_path, capsys):
    kube.reject(
        "rayclusters",
        "raymoe",
        "spec.workerGroupSpecs[0].replicas",
        "Invalid value: 2: must be less than or equal to maxReplicas",
    )

    code = deploy(kube, tmp_path, "apply", str(manifests))

    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "raymoe deploy apply: RayCluster/raymoe rejected by the API server: spec.workerGroupSpecs[0].replicas: "
        "Invalid value: 2: must be less than or equal to maxReplicas: fix the manifest"
    )


def test_missing_namespace_and_bad_credentials(kube, manifests, tmp_path, capsys):
    assert deploy(kube, tmp_path, "apply", str(manifests), "-n", "nowhere") == 2
    assert (
        "ConfigMap/raymoe-config: namespace nowhere not found: create it or pass --namespace" in capsys.readouterr().err
    )
    config = kube.kubeconfig(tmp_path / "kubeconfig")
    config.write_text(config.read_text().replace(kube.token, "expired"))
    assert deploy(config, tmp_path, "status", str(manifests)) == 2
    assert f"the API server at {kube.url} rejected the credentials (401 Unauthorized)" in capsys.readouterr().err


def test_manifest_problems_fail_before_any_call(kube, manifests, tmp_path, capsys):
    (manifests / "deployment.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
    assert deploy(kube, tmp_path, "apply", str(manifests)) == 2
    assert "deployment.yaml: apiVersion 'apps/v1' kind 'Deployment' is not one" in capsys.readouterr().err
    (manifests / "deployment.yaml").unlink()
    (manifests / "configmap.yaml").write_text(
        CONFIGMAP.replace("name: raymoe-config", "name: raymoe-config\n  namespace: prod")
    )
    assert deploy(kube, tmp_path, "apply", str(manifests), "-n", "raymoe") == 2
    assert "sets namespace 'prod' but --namespace is 'raymoe'" in capsys.readouterr().err
    assert kube.requests == []


def test_a_plain_text_404_from_an_older_api_server_still_means_no_crd():
    from raymoe.deploy.kube_manifests import KINDS

    err = explain_api_error(
        404,
        b"404 page not found\n",
        verb="patch",
        resource="rayjobs.ray.io",
        ref="RayJob/train",
        namespace="raymoe",
        kind=KINDS[("ray.io/v1", "RayJob")],
    )
    assert (str(err), err.exit_code) == (
        "RayJob/train: KubeRay CRD rayjobs.ray.io not installed: install the KubeRay operator v1.7.0",
        2,
    )


def test_the_fake_server_flags_calls_a_real_one_would_not_expect(tmp_path):
    from kubernetes import client, config

    kube = FakeKubeApi()
    try:
        cfg = client.Configuration()
        config.load_kube_config(str(kube.kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg)
        api = client.CustomObjectsApi(client.ApiClient(cfg))
        body = yaml.safe_load(RAYCLUSTER)
        with pytest.raises(client.ApiException) as merge_patch:  # the client's default patch type
            api.patch_namespaced_custom_object(
                "ray.io", "v1", "raymoe", "rayclusters", "raymoe", body, field_manager="raymoe"
            )
        with pytest.raises(client.ApiException) as other_manager:
            api.patch_namespaced_custom_object(
                "ray.io",
                "v1",
                "raymoe",
                "rayclusters",
                "raymoe",
                body,
                field_manager="kubectl",
                _content_type="application/apply-patch+yaml",
            )
        with pytest.raises(client.ApiException) as background:
            api.delete_namespaced_custom_object("ray.io", "v1", "raymoe", "rayclusters", "raymoe")
    finally:
        kube.close()
    assert merge_patch.value.status == other_manager.value.status == background.value.status == 400
    assert kube.violations == [
        "PATCH rayclusters/raymoe with Content-Type 'application/merge-patch+json', not application/apply-patch+yaml",
        "apply of rayclusters/raymoe with fieldManager 'kubectl'",
        "DELETE ('rayclusters', 'raymoe', 'raymoe') with propagationPolicy=None",
    ]
    assert set(kube.objects) == STARTING_NAMESPACES


def test_in_a_pod_without_a_kubeconfig_the_service_account_is_used(tmp_path, monkeypatch):
    # Prepare: the files and variables a pod's service account provides.
    import kubernetes.config
    import kubernetes.config.incluster_config as incluster

    from raymoe.deploy import kube_client

    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("not used before a request")
    (tmp_path / "namespace").write_text("raymoe-prod\n")
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setattr(kube_client, "SA_NAMESPACE_FILE", str(tmp_path / "namespace"))
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    # Execute
    conn = kube_client.connect()

    # Assert
    assert (conn.host, conn.namespace) == ("https://10.96.0.1:443", "raymoe-prod")
    # The auth scheme is case-insensitive (RFC 9110); this client writes "bearer".
    assert conn.api_client.configuration.auth_settings()["BearerToken"]["value"].lower() == "bearer sa-token"


def test_wait_on_a_terminal_draws_a_progress_bar(kube, manifests, tmp_path):
    # Prepare
    import io

    from raymoe.deploy.deploy_cli import _wait
    from raymoe.deploy.kube_client import KubeClient, connect
    from raymoe.deploy.kube_manifests import load_manifests

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    deploy(kube, tmp_path, "apply", str(manifests / "raycluster.yaml"))
    kube.set_status("rayclusters", "raymoe", "raymoe", RAYCLUSTER_READY, after_gets=2)
    conn = connect(str(tmp_path / "kubeconfig"))
    targets = [(m, "raymoe") for m in load_manifests([manifests / "raycluster.yaml"])]
    screen = Terminal()

    # Execute
    code = _wait(
        KubeClient(conn.api_client, conn.host), targets, want=READY, timeout_s=30, interval_s=0.01, stream=screen
    )

    # Assert
    assert code == 0
    assert "ready: 100%" in screen.getvalue() and "1/1" in screen.getvalue()
