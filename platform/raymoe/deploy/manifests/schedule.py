"""The drift check on a schedule: a CronJob that (re)creates the drift RayJob.

KubeRay v1.7.0's RayJob has no schedule field; its RayCronJob kind is alpha behind the
`RayCronJob` feature gate (off by default) and its CRD is not among the ones installed here, so a
plain Kubernetes CronJob creates the RayJob. The RayJob's manifest travels in a ConfigMap; each
run skips while the previous check is still going, otherwise deletes the finished one and creates
it again (`kubectl create`, so a changed ConfigMap takes effect at the next run).
"""

from __future__ import annotations

from raymoe.deploy.manifests import pods
from raymoe.deploy.manifests.rayjob import rayjob
from raymoe.deploy.manifests.values import DeployValues, PodResources
from raymoe.deploy.manifests.yaml_text import Note, emit

SCHEDULER_SA = "drift-scheduler"
MANIFEST_DIR = "/etc/raymoe"
MANIFEST_KEY = "rayjob.yaml"

# Terminal states of a RayJob (KubeRay v1.7.0 apis/ray/v1/rayjob_types.go JobDeploymentStatus).
SCRIPT = """\
set -euo pipefail
name="$RAYJOB_NAME"
if state=$(kubectl get rayjob "$name" -o 'jsonpath={.status.jobDeploymentStatus}' 2>/dev/null); then
  case "$state" in
    Complete|Failed|ValidationFailed) kubectl delete rayjob "$name" --wait=true ;;
    *) echo "drift check $name is still ${state:-starting}; skipping this run"; exit 0 ;;
  esac
fi
kubectl create -f "$MANIFEST"
"""


def scheduled_name(values: DeployValues) -> str:
    return f"{values.name}-drift-scheduled"


def drift_configmap(values: DeployValues) -> dict:
    """The RayJob the CronJob creates, as YAML text (namespace from the CronJob's pod)."""
    job = rayjob(values, "drift", object_name=scheduled_name(values), namespace=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{values.name}-drift-rayjob",
            "namespace": values.namespace,
            "labels": pods.labels(values, "drift-schedule"),
        },
        "data": {MANIFEST_KEY: emit(job)},
    }


def drift_cronjob(values: DeployValues) -> dict:
    volumes = [
        {"name": "manifest", "configMap": {"name": f"{values.name}-drift-rayjob"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    security = pods.container_security()
    container = {
        "name": "create-rayjob",
        "image": values.kubectl_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["bash", "-c", SCRIPT],
        "env": [
            {"name": "RAYJOB_NAME", "value": scheduled_name(values)},
            {"name": "MANIFEST", "value": f"{MANIFEST_DIR}/{MANIFEST_KEY}"},
            Note({"name": "HOME", "value": "/tmp"}, "kubectl keeps its discovery cache under $HOME."),
        ],
        "resources": pods.resources(PodResources(cpu="100m", memory="128Mi")),
        # The kubectl image's nonroot user.
        "securityContext": Note(dict(security.value, runAsUser=65532), security.why),
        "volumeMounts": [
            {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_security = dict(pods.pod_security(), runAsUser=65532, runAsGroup=65532, fsGroup=65532)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {
            "name": f"{values.name}-drift",
            "namespace": values.namespace,
            "labels": pods.labels(values, "drift-schedule"),
        },
        "spec": {
            "schedule": values.drift_schedule,
            "concurrencyPolicy": Note("Forbid", "One creator at a time; the script also skips while a check runs."),
            "startingDeadlineSeconds": Note(
                600, "A run missed by more than this (controller down) is skipped, not piled up."
            ),
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "activeDeadlineSeconds": 300,
                    "ttlSecondsAfterFinished": 86400,
                    "template": {
                        "metadata": {"labels": pods.labels(values, "drift-schedule")},
                        "spec": {
                            "serviceAccountName": Note(
                                f"{values.name}-{SCHEDULER_SA}",
                                "May get, create and delete RayJobs in this namespace, nothing else.",
                            ),
                            "securityContext": Note(pod_security, "The kubectl image's nonroot user (65532)."),
                            "restartPolicy": "Never",
                            "containers": [container],
                            "volumes": volumes,
                        },
                    },
                }
            },
        },
    }
