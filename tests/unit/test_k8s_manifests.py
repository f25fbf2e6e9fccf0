"""k8s/: every manifest is current, valid against its schema, secure, and says what it does.

- Custom resources are validated against the KubeRay v1.7.0 CRDs (../shared/k8s/crds) and the
  prometheus-operator v0.93.0 CRDs (tests/data/crds), converted to JSON Schema with unknown fields
  rejected wherever the schema lists properties and does not preserve unknown fields (what
  kubeconform's converter does and `kubectl --validate=strict` enforces on the server).
- Core kinds are validated with kubernetes-validate --strict.
- KubeRay's own admission rules that a schema cannot express (ray-operator/controllers/ray/utils/
  validation.go, v1.7.0) are checked on the rendered specs.
- Security rules: no root, no privilege, no hostPath, no exposed Ray ports, secrets only by
  reference, requests and limits on every container.
"""

from __future__ import annotations

import copy
import math
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raymoe.config import ConfigError, from_dict
from raymoe.deploy.manifests import DeployValues, render_manifests
from raymoe.deploy.manifests.kustomize import apply_patch, json_patch
from raymoe.deploy.manifests.presets import PRESETS
from raymoe.deploy.manifests.render import checked, job_resources, platform_resources, stale_files
from raymoe.deploy.manifests.schedule import SCRIPT
from raymoe.deploy.manifests.serve_policy import plan_serving, target_ongoing_requests
from raymoe.deploy.manifests.values import PodResources, ServeValues
from raymoe.deploy.manifests.yaml_text import Note, emit, plain

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERAY_CRDS = ROOT.parent / "shared" / "k8s" / "crds"
VENDORED_CRDS = ROOT / "tests" / "data" / "crds"
K8S_VERSION = "1.33.0"
RAY_PORTS = {6379, 8265, 10001}
CUSTOM_GROUPS = {"ray.io", "monitoring.coreos.com"}

RENDERED = render_manifests()


def all_docs() -> list[tuple[str, dict]]:
    """(path, document) for every rendered resource, the drift RayJob inside its ConfigMap too."""
    out = []
    for path, text in sorted(RENDERED.items()):
        if path.endswith(("kustomization.yaml", ".patch.yaml")):
            continue
        doc = yaml.safe_load(text)
        out.append((path, doc))
        if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
            out.append((f"{path}#rayjob.yaml", yaml.safe_load(doc["data"]["rayjob.yaml"])))
    return out


DOCS = all_docs()


# --- CRD schema -> JSON Schema --------------------------------------------------------------


def to_json_schema(node):
    """An openAPIV3Schema as a strict JSON Schema: `additionalProperties: false` wherever the
    schema lists properties and does not say x-kubernetes-preserve-unknown-fields."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        out["additionalProperties"] = False
    if "(?i)" in out.get("pattern", "")[1:]:
        # Go's regexp allows inline flags anywhere; Python's only at the start.
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crd_schemas(folder: Path) -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(folder.glob("*.yaml")):
        # libyaml's loader: the three KubeRay CRDs are 3.3 MB, ten times slower in pure Python.
        for crd in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                api = f"{crd['spec']['group']}/{version['name']}"
                schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                # apiVersion/kind/metadata are the API server's; metadata is ObjectMeta.
                schema["properties"]["metadata"] = {"type": "object"}
                schemas[(api, crd["spec"]["names"]["kind"])] = schema
    return schemas


@pytest.fixture(scope="module")
def crd_schemas():
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS}")
    return {**load_crd_schemas(KUBERAY_CRDS), **load_crd_schemas(VENDORED_CRDS)}


@pytest.fixture(scope="module")
def crd_validators(crd_schemas):
    """One validator per kind the manifests use, its schema checked once (jsonschema.validate
    re-checks every call). Draft 4 is the dialect OpenAPI v3 schemas are written in (boolean
    exclusiveMinimum); it is also the one the schema check is fast with: checking these schemas
    against the 2020-12 metaschema took half a minute."""
    used = {(d["apiVersion"], d["kind"]) for _, d in DOCS}
    out = {}
    for key, schema in crd_schemas.items():
        if key in used:
            jsonschema.Draft4Validator.check_schema(schema)
            out[key] = jsonschema.Draft4Validator(schema)
    return out


def test_the_converted_schema_rejects_unknown_fields(crd_validators):
    # Prepare: a valid RayJob with one misspelt field deep inside its pod template.
    rayjob = copy.deepcopy(next(d for p, d in DOCS if d["kind"] == "RayJob"))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["imagePullPolicyy"] = "Always"
    # Execute / Assert
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        crd_validators[("ray.io/v1", "RayJob")].validate(rayjob)


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in DOCS if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_custom_resources_match_their_crd(path, doc, crd_validators):
    validator = crd_validators.get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"{path}: no CRD for {doc['apiVersion']} {doc['kind']}"
    validator.validate(doc)


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in DOCS if d["apiVersion"].split("/")[0] not in CUSTOM_GROUPS],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_core_kinds_validate_strictly(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- currentness, determinism, the YAML writer -----------------------------------------------


def test_committed_files_are_the_render_of_the_defaults():
    assert stale_files(RENDERED, K8S) == [], "k8s/ is stale: run `raymoe manifests render --out k8s`"


def test_rendering_is_deterministic():
    assert render_manifests() == RENDERED


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_comments_never_change_the_data(preset):
    values = checked(PRESETS[preset](DeployValues())) if preset else DeployValues()
    for tree, _ in [*platform_resources(values).values(), *job_resources(values).values()]:
        assert yaml.safe_load(emit(tree, "header")) == plain(tree)


def test_writer_handles_blocks_notes_and_awkward_scalars():
    tree = {
        "a": Note({"b": ["x", Note({"k": "0", "v": True}, "why\ntwo lines")]}, "top"),
        "script": "set -e\necho hi\n",
        "json": '{\n  "a": 1\n}',
        "empty": {},
        "none": [],
        "num": "1.0",
        "colon": "a: b",
        "slash/key": "on",
    }
    text = emit(tree, "head")
    assert yaml.safe_load(text) == plain(tree)
    assert "    # why\n    # two lines\n    - k: '0'\n      v: true\n" in text
    assert text.startswith("# head\n")


def test_every_resource_file_says_what_it_is():
    for path, text in RENDERED.items():
        assert text.startswith("# "), path


# --- overlays ---------------------------------------------------------------------------------


def test_json_patch_round_trips():
    old = {"a": [1, 2], "b": {"c/d": 1, "e": 2}, "f": "x"}
    new = {"a": [1, 3], "b": {"c/d": 2, "g": 3}, "h": [1]}
    ops = json_patch(old, new)
    assert {"op": "replace", "path": "/b/c~1d", "value": 2} in ops
    assert apply_patch(old, ops) == new


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_kustomize_builds_what_the_values_render(preset):
    # Prepare: what rendering the overlay's values directly gives.
    values = checked(PRESETS[preset](DeployValues())) if preset else DeployValues()
    want = {(t["kind"], t["metadata"]["name"]): plain(t) for t, _ in platform_resources(values).values()}
    folder = K8S / ("base" if preset is None else f"overlays/{preset}")
    # Execute: kubectl's kustomize on the committed files.
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    got = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    # Assert
    assert got == want


def test_overlay_jobs_are_rendered_with_the_overlay_values():
    for preset, derive in PRESETS.items():
        values = checked(derive(DeployValues()))
        for file, (tree, _) in job_resources(values).items():
            assert yaml.safe_load(RENDERED[f"overlays/{preset}/jobs/{file}"]) == plain(tree)


# --- KubeRay admission rules (validation.go) and the autoscaling plan -------------------------


def cluster_specs():
    for path, doc in DOCS:
        spec = doc.get("spec", {})
        if doc["kind"] == "RayCluster":
            yield path, spec
        elif doc["kind"] == "RayJob":
            yield path, spec["rayClusterSpec"]
        elif doc["kind"] == "RayService":
            yield path, spec["rayClusterConfig"]


def test_cluster_specs_pass_kuberays_admission_rules():
    for path, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", path
        assert spec["enableInTreeAutoscaling"] and spec["autoscalerOptions"]["version"] == "v2", path
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0), f"{path}: token auth needs Ray >= 2.52"
        for group in [head, *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod.get("restartPolicy", "Never") == "Never", f"{path}: autoscaler v2 needs restartPolicy Never"
            env = {e["name"] for e in pod["containers"][0].get("env", [])}
            assert "RAY_enable_autoscaler_v2" not in env, f"{path}: set autoscalerOptions.version only"
            start = group["rayStartParams"]
            assert not (group.get("resources") and set(start) & {"num-cpus", "num-gpus", "memory", "resources"}), path
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], path
        if "gcsFaultToleranceOptions" in spec:
            env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
            assert not env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}, path
            assert "redis-password" not in head["rayStartParams"], path


def test_rayjobs_pass_kuberays_admission_rules():
    for path, doc in DOCS:
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert len(doc["metadata"]["name"]) <= 47, path  # KubeRay MaxRayJobNameLength
        assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] >= 0, path
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0, path
        assert "deletionStrategy" not in spec, path
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], path
        assert spec["entrypoint"].startswith("python -m pipelines."), path
        args = shlex.split(spec["entrypoint"].split(" && ")[0])
        assert Path(ROOT, args[args.index("--config") + 1]).is_file(), f"{path}: config not in the repository"


def test_rayservice_upgrades_and_scales_as_planned():
    doc = yaml.safe_load(RENDERED["base/rayservice.serve.yaml"])
    spec = doc["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "raymoe.serve.app:build_app"
    plan = plan_serving(DeployValues().serve)
    assert app["args"]["autoscaling"] == plan.autoscaling
    group = spec["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (plan.min_nodes, plan.max_nodes)
    workers = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    assert workers[0]["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": "serve"}
    assert workers[0]["livenessProbe"]["httpGet"]["path"] == "/api/healthz"


def test_serve_args_are_a_valid_serve_config():
    from raymoe.serve.serve_config import ServeConfig

    for _path, doc in DOCS:
        if doc["kind"] == "RayService":
            args = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
            from_dict(ServeConfig, args)


def test_target_ongoing_requests_by_hand():
    # 8 slots, each request holds one for 8 s: a slot frees every second. With a 2 s SLO and a
    # 0.25 s prefill, one queued request starts after ~1 s (TTFT ~1.25 s, fine), a second after
    # ~2 s (TTFT ~2.25 s, too late): target = 8 + 1.
    assert target_ongoing_requests(8, 2.0, 8.0, 0.25, 32) == 9.0
    # Fast requests: 4 slots, 0.5 s each -> 8 slot-frees per second; (2 - 0.5) * 8 = 12 queued.
    assert target_ongoing_requests(4, 2.0, 0.5, 0.5, 32) == 16.0
    # Capped by max_ongoing_requests; at least 1 even when prefill alone breaks the SLO.
    assert target_ongoing_requests(16, 10.0, 0.1, 0.0, 32) == 32.0
    assert target_ongoing_requests(1, 0.1, 1.0, 0.5, 32) == 1.0


def test_serving_group_bounds_fit_the_replicas():
    # 2-CPU replicas on 4-CPU pods: 2 per pod; 1..4 replicas -> 1..2 pods.
    serve = ServeValues()
    plan = plan_serving(serve)
    assert plan.replicas_per_node == 2 and (plan.min_nodes, plan.max_nodes) == (1, 2)
    # ep=2 shard workers of 1 CPU each make a replica 2 + 2 = 4 CPUs: 1 per pod, 4 pods.
    serve.app.update(ep=2, shard_num_cpus=1.0)
    assert plan_serving(serve).max_nodes == 4
    # ep=4 shards of 2 CPUs: 2 + 8 = 10 CPUs span 3 pods; 1..4 replicas -> 3..12 pods.
    serve.app.update(ep=4, shard_num_cpus=2.0)
    plan = plan_serving(serve)
    assert (plan.nodes_per_replica, plan.min_nodes, plan.max_nodes) == (3, 3, 12)
    # Without shard workers a replica must fit in one pod.
    serve.app.update(ep=1, num_gpus=1.0)
    with pytest.raises(ConfigError, match=r"serve\.worker offers 4 CPU and 0 GPU"):
        plan_serving(serve)
    assert math.isclose(PodResources(cpu="1500m", memory="1Gi").num_cpus(), 2)


def test_values_fail_at_the_edge_with_the_key_named():
    with pytest.raises(ConfigError, match=r"unknown key jobs\.train\.step"):
        from_dict(DeployValues, {"jobs": {"train": {"config": "x", "step": 1}}})
    with pytest.raises(ConfigError, match="max_replicas"):
        from_dict(
            DeployValues,
            {
                "worker_groups": [
                    {"name": "cpu", "min_replicas": 3, "max_replicas": 1, "resources": {"cpu": "1", "memory": "1Gi"}}
                ]
            },
        )
    with pytest.raises(ConfigError, match="Kubernetes quantity"):
        PodResources(cpu="two", memory="1Gi")


# --- security ---------------------------------------------------------------------------------


def pod_specs():
    """(where, pod spec) for every pod template in every document."""

    def walk(node, where):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                yield where, node
            for k, v in node.items():
                yield from walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{where}[{i}]")

    for path, doc in DOCS:
        yield from walk(doc, path)


def containers():
    for where, pod in pod_specs():
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            yield f"{where}/{c['name']}", pod, c
    for path, spec in cluster_specs():
        yield f"{path}/autoscaler", {}, {"name": "autoscaler", **spec["autoscalerOptions"]}


def test_no_container_runs_as_root_or_privileged():
    seen = 0
    for where, pod, c in containers():
        sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", psc.get("runAsUser", 0)) != 0, where
        assert not sc.get("privileged", False), where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert (sc.get("seccompProfile") or psc.get("seccompProfile"))["type"] == "RuntimeDefault", where
        seen += 1
    assert seen > 30


def test_no_host_access():
    for where, pod in pod_specs():
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), where


def test_every_container_has_requests_equal_to_limits():
    for where, _, c in containers():
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), where
        assert res["requests"] == res.get("limits"), where


def test_ray_ports_are_never_exposed_outside_the_cluster():
    for path, doc in DOCS:
        if doc["kind"] == "Service":
            exposed = doc["spec"].get("type") in ("LoadBalancer", "NodePort")
            assert not (exposed and {p["port"] for p in doc["spec"]["ports"]} & RAY_PORTS), path
    for path, spec in cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path


def test_network_policies_open_only_the_serve_port_beyond_the_namespace():
    policies = [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            peers = rule.get("from")
            same_namespace_only = peers and all(p == {"podSelector": {}} for p in peers)
            ports = {p["port"] for p in rule.get("ports", [])}
            if same_namespace_only:
                continue
            if peers is None:  # from anywhere
                assert ports == {8000}, policy["metadata"]["name"]
            else:  # from named namespaces: the operator (dashboard, serve check) and Prometheus
                assert ports and ports <= {8265, 8000, 8080}, policy["metadata"]["name"]
                assert 6379 not in ports and 10001 not in ports
    selected = [p["spec"]["podSelector"]["matchLabels"] for p in policies]
    assert {"ray.io/is-ray-node": "yes"} in selected


def test_secrets_arrive_only_by_reference():
    names = set(vars(DeployValues().secrets).values())
    assert not [p for p, d in DOCS if d["kind"] == "Secret"]
    for where, _, c in containers():
        for env in c.get("env", []):
            secretish = any(w in env["name"].upper() for w in ("KEY", "TOKEN", "PASSWORD", "SECRET"))
            if secretish:
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] in names, where
    for path, spec in cluster_specs():
        if "gcsFaultToleranceOptions" in spec:
            ref = spec["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] in names, path


def test_only_the_head_and_the_scheduler_get_an_api_token():
    for where, pod in pod_specs():
        token = pod.get("automountServiceAccountToken")
        if token:
            assert pod["serviceAccountName"] in ("raymoe-head", "raymoe-drift-scheduler"), where
    roles = {d["metadata"]["name"]: d["rules"] for _, d in DOCS if d["kind"] == "Role"}
    verbs = {
        (g, r, v)
        for rules in roles.values()
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert not any(v in ("*", "escalate", "bind", "impersonate") or r in ("*", "secrets") for _, r, v in verbs)


# --- the drift schedule's script --------------------------------------------------------------

FAKE_KUBECTL = """#!/bin/bash
echo "$*" >> "$LOG"
if [ "$1" = get ]; then
  [ -n "${STATE+x}" ] || exit 1
  printf '%s' "$STATE"
fi
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize(
    "state,calls",
    [
        (None, ["get rayjob raymoe-drift-scheduled", "create -f"]),
        ("Complete", ["get rayjob", "delete rayjob raymoe-drift-scheduled --wait=true", "create -f"]),
        ("Failed", ["get rayjob", "delete rayjob", "create -f"]),
        ("Running", ["get rayjob"]),
        ("", ["get rayjob"]),
    ],
)
def test_schedule_script_replaces_only_a_finished_check(tmp_path, state, calls):
    # Prepare: a fake kubectl that logs its arguments and reports the RayJob's state.
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "log"
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        "LOG": str(log),
        "RAYJOB_NAME": "raymoe-drift-scheduled",
        "MANIFEST": "/etc/raymoe/rayjob.yaml",
    }
    if state is not None:
        env["STATE"] = state
    # Execute
    subprocess.run(["bash", "-c", SCRIPT], env=env, check=True, capture_output=True)
    # Assert
    lines = log.read_text().splitlines()
    assert len(lines) == len(calls) and all(line.startswith(c) for line, c in zip(lines, calls))


# --- `raymoe manifests render` ----------------------------------------------------------------


def manifests_cli(argv: list[str]) -> int:
    import argparse

    from raymoe.deploy.manifests.cli import add_manifests_command

    parser = argparse.ArgumentParser(prog="raymoe")
    add_manifests_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_passes_on_the_committed_files(capsys):
    assert manifests_cli(["manifests", "render", "--out", str(K8S), "--check"]) == 0
    assert "are current" in capsys.readouterr().out


def test_cli_renders_values_files_and_flags_stale_output(tmp_path, capsys):
    values = tmp_path / "values.yaml"
    values.write_text("namespace: team-a\nserve:\n  scaling: {max_replicas: 6}\n")
    out = tmp_path / "k8s"
    assert manifests_cli(["manifests", "render", "--out", str(out), "--values", str(values)]) == 0
    assert yaml.safe_load((out / "base/namespace.yaml").read_text())["metadata"]["name"] == "team-a"
    (out / "base/namespace.yaml").write_text("# edited by hand\n")
    (out / "base/extra.yaml").write_text("{}\n")
    assert manifests_cli(["manifests", "render", "--out", str(out), "--values", str(values), "--check"]) == 1
    printed = capsys.readouterr().out
    assert "stale: " in printed and "base/namespace.yaml" in printed and "base/extra.yaml" in printed


def test_cli_fills_the_serving_layout_from_the_planner(tmp_path):
    # Prepare: the planner's plan for DeepSeek-V3 on H100 nodes (ep=16 over 2 nodes of 8 GPUs).
    from raymoe.deploy.planner import PlanConfig, plan

    expected = plan(PlanConfig(model="deepseek-v3", fleet="h100-80g")).to_dict()
    out = tmp_path / "k8s"
    # Execute
    assert (
        manifests_cli(["manifests", "render", "--out", str(out), "--model", "deepseek-v3", "--fleet", "h100-80g"]) == 0
    )
    # Assert: one replica = ep shard workers with a GPU each, on whole 8-GPU nodes.
    service = yaml.safe_load((out / "base/rayservice.serve.yaml").read_text())["spec"]
    args = yaml.safe_load(service["serveConfigV2"])["applications"][0]["args"]
    ep = expected["layout"]["ep"]
    assert args["ep"] == ep and args["shard_num_gpus"] == 1.0 and args["num_gpus"] == 0.0
    assert args["engine"]["num_slots"] == expected["decode"]["batch_per_gpu"] * ep
    group = service["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(expected["gpus_per_node"])
    replicas = max(1, expected["replicas"])
    assert group["minReplicas"] == replicas * expected["nodes_per_replica"]
    assert group["maxReplicas"] == 2 * replicas * expected["nodes_per_replica"]


def test_cli_names_what_is_wrong(capsys):
    assert manifests_cli(["manifests", "render", "--model", "deepseek-v3"]) == 2
    assert "--model and --fleet go together" in capsys.readouterr().err
