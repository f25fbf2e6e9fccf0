"""Federated LoRA on a local multi-node Ray cluster: one node per silo, each with its resource.

- each silo actor runs on its own silo's node (node ids), the driver never opens a silo's data
  path (an audit hook records every `open` in this process), and what a silo returns is adapter
  tensors and counts only (no record text inside its pickled bytes);
- a silo whose node is removed mid-round is a dropout: the round completes with the others;
- FedAvg over identical silos equals centralised fine-tuning (a single process, same steps);
- secure aggregation gives FedAvg's adapter to fixed-point tolerance, and a silo killed after
  the keys were exchanged aborts the attempt, which is retried with the survivors;
- DP: clipped + noised rounds report a growing epsilon;
- SIGKILL of the server process after round 1 and a rerun end with the same adapter as an
  uninterrupted run.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raymoe.config import from_dict
from raymoe.federated.config import FederatedConfig
from raymoe.serve.debug_artifact import make_debug_artifact

ROOT = Path(__file__).resolve().parents[2]
SILO_DATA = {name: ROOT / "data" / "sft" / "silos" / name / "train.jsonl" for name in ("code", "prose", "chat")}
HELDOUT = ROOT / "data" / "sft" / "silos" / "heldout.jsonl"


@pytest.fixture(scope="module")
def cluster():
    """Head (the driver's node, no silo resource) + one node per silo."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared single-node test cluster; later tests start it again
    # Token auth is decided explicitly: off for this loopback-only cluster (Ray 2.60 turns it on).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Every node binds to 127.0.0.1; ray.init(address="127.0.0.1:port") would otherwise rewrite the
    # loopback address to the machine's network address, where nothing listens.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    nodes = {
        name: c.add_node(num_cpus=1, resources={f"silo_{name}": 1}, node_ip_address="127.0.0.1") for name in SILO_DATA
    }
    ray.init(
        address=c.address,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}},
    )
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = True


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "base"
    texts = [line for line in HELDOUT.read_text().splitlines() if line.strip()]
    make_debug_artifact(path, seed=0, vocab_size=512, corpus=texts, dim=64, num_layers=2, max_seq_len=256)
    return path


def _cfg(base, out, silos=None, **over):
    data = {
        "name": f"fed-{out.name}",
        "base": str(base),
        "eval_path": str(HELDOUT),
        "rounds": 2,
        "local_steps": 2,
        "local_batch_size": 4,
        "seed": 3,
        "output_dir": str(out),
        "silos": [{"name": n, "data_path": str(p)} for n, p in (silos or SILO_DATA).items()],
        "lora": {"rank": 4, "alpha": 8, "routed_experts": True},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "num_cpus_per_silo": 0.5,
        "faults": {"round_deadline_s": 120, "quorum": 2},
    }
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return from_dict(FederatedConfig, data)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def test_silos_on_their_nodes_and_data_stays_home(cluster, base, tmp_path):
    import ray

    from raymoe.federated.job import run_federated

    _, nodes = cluster
    opened = []
    watched = {str(p.resolve()) for p in SILO_DATA.values()}
    sys.addaudithook(
        lambda event, args: (
            opened.append(str(args[0]))
            if event == "open" and args and isinstance(args[0], str) and os.path.abspath(args[0]) in watched
            else None
        )
    )
    summary = run_federated(_cfg(base, tmp_path / "home"))
    # Assert: each silo on its own node, the driver opened no silo file, two rounds done.
    for name, node in nodes.items():
        assert summary["silos"][name]["node_id"] == node.node_id
    assert opened == []
    assert summary["rounds"] == 2 and len(summary["history"][-1]["participants"]) == 3
    assert summary["history"][-1]["eval_loss"] < summary["history"][0]["eval_loss"] + 1.0
    # What one silo returns: adapter tensors, counts and scalars; none of its records' text.
    from raymoe.federated.silo import SiloClient
    from raymoe.federated.strategies import FitInstructions

    initial = dict(_adapter(tmp_path / "home").items())
    actor = (
        ray.remote(SiloClient)
        .options(resources={"silo_code": 1}, num_cpus=0.5)
        .remote(
            "code",
            str(SILO_DATA["code"]),
            str(base),
            {"rank": 4, "alpha": 8, "routed_experts": True},
            {"lr": 1e-3},
            256,
            4,
            0,
            1,
        )
    )
    result = ray.get(
        actor.fit.remote(FitInstructions(round=1, params=initial, proximal_mu=0.0, local_steps=1, lr=1e-3))
    )
    ray.kill(actor)
    assert set(result.params) == set(initial)
    assert all(t.dtype == torch.float32 for t in result.params.values())
    assert result.tokens_per_expert_LE.dtype == torch.int64 and result.masked is None
    blob = pickle.dumps(result)
    answers = [json.loads(line)["messages"][-1]["content"] for line in SILO_DATA["code"].read_text().splitlines()]
    leaked = [a for a in answers if len(a) >= 8 and a.encode() in blob]
    assert leaked == []


def test_removed_node_is_a_dropout(cluster, base, tmp_path):
    from raymoe.federated.job import run_federated

    c, nodes = cluster

    def remove_chat_node(round, selected):
        if round == 2 and "chat" in nodes:
            c.remove_node(nodes.pop("chat"), allow_graceful=False)

    summary = run_federated(_cfg(base, tmp_path / "drop", rounds=3), on_round_start=remove_chat_node)
    rounds = {r["round"]: r for r in summary["history"]}
    assert sorted(rounds[1]["participants"]) == ["chat", "code", "prose"]
    assert sorted(rounds[2]["participants"]) == ["code", "prose"] and rounds[2]["dropped"] == ["chat"]
    assert sorted(rounds[3]["participants"]) == ["code", "prose"]
    c.add_node(num_cpus=1, resources={"silo_chat": 1}, node_ip_address="127.0.0.1")


def test_fedavg_of_identical_silos_equals_centralised(cluster, base, tmp_path):
    from raymoe.federated.job import run_federated
    from raymoe.train.finetune_config import FinetuneConfig
    from raymoe.train.finetune_worker import run_finetune_worker

    same = dict.fromkeys(("code", "prose", "chat"), SILO_DATA["code"])
    run_federated(_cfg(base, tmp_path / "same", silos=same, rounds=3, local_optimizer_state="keep"))
    central = from_dict(
        FinetuneConfig,
        {
            "base": str(base),
            "data": {"path": str(SILO_DATA["code"])},
            "steps": 6,
            "global_batch_size": 4,
            "seed": 3,
            "output_dir": str(tmp_path / "central"),
            "lora": {"rank": 4, "alpha": 8, "routed_experts": True},
            "optim": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        },
    )
    torch.set_num_threads(1)
    run_finetune_worker(central)
    fed, ref = _adapter(tmp_path / "same"), _adapter(tmp_path / "central")
    assert set(fed) == set(ref)
    # Identical silos average to exactly their common update; what remains is float reordering.
    for key in ref:
        torch.testing.assert_close(fed[key], ref[key], rtol=1e-5, atol=1e-6)
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)


def test_secure_aggregation_equals_plain_and_survives_a_dropout(cluster, base, tmp_path):
    import ray

    from raymoe.federated.job import run_federated

    # MoE-aware weighting: under secure aggregation the per-expert token weights travel masked too.
    moe_aware = {"name": "fedavg", "moe_aware": True}
    run_federated(_cfg(base, tmp_path / "plain", rounds=1, strategy=moe_aware))
    run_federated(_cfg(base, tmp_path / "secure", rounds=1, strategy=moe_aware, privacy={"secure_aggregation": True}))
    plain, secure = _adapter(tmp_path / "plain"), _adapter(tmp_path / "secure")
    for key in plain:  # fixed point with 24 fractional bits: 3 silos x 2**-24 per value, before /weights
        torch.testing.assert_close(secure[key], plain[key], rtol=0, atol=1e-5)

    def kill_prose_after_keys(round, selected):
        if "prose" in selected:
            ray.kill(ray.get_actor("fed-dropout-silo-prose"))

    summary = run_federated(
        _cfg(base, tmp_path / "dropout", rounds=1, privacy={"secure_aggregation": True}),
        on_round_start=kill_prose_after_keys,
    )
    assert sorted(summary["history"][0]["participants"]) == ["chat", "code"]


def test_dp_rounds_report_growing_epsilon(cluster, base, tmp_path):
    from raymoe.federated.job import run_federated

    summary = run_federated(_cfg(base, tmp_path / "dp", rounds=2, privacy={"clip_norm": 0.5, "noise_multiplier": 1.0}))
    eps = [r["epsilon"] for r in summary["history"]]
    assert 0 < eps[0] < eps[1]


def test_sigkilled_server_resumes_to_the_same_adapter(cluster, base, tmp_path):
    c, _ = cluster
    # The same loopback setting as the fixture, for the driver process (read at Ray's import).
    env = {
        **os.environ,
        "RAY_ADDRESS": c.address,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }

    def job(out, rounds=3):
        cfg = _cfg(base, out, rounds=rounds)
        path = tmp_path / f"{out.name}.yaml"
        import yaml

        from raymoe.config import to_dict

        path.write_text(yaml.safe_dump(to_dict(cfg)))
        return [sys.executable, "-m", "pipelines.federated", "--config", str(path)]

    subprocess.run(job(tmp_path / "straight"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(job(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "rounds" / "round-00001.sha256"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "round 1 was never saved"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    rerun = subprocess.run(job(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed after round" in rerun.stdout
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(killed)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_rounds_past_their_deadline_stop_the_job_and_keep_the_last_round(cluster, base, tmp_path):
    from raymoe.federated.job import run_federated
    from raymoe.federated.round_state import load_latest_round_state
    from raymoe.federated.server import FederatedJobFailed

    out = tmp_path / "late"
    run_federated(_cfg(base, out, rounds=1))
    # Round 2 with a deadline no silo can meet: every silo is late, twice, then the job stops.
    with pytest.raises(FederatedJobFailed, match="round 2 missed its quorum of 2 accepted updates in 2 attempts"):
        run_federated(
            _cfg(base, out, name="late-again", rounds=2, faults={"round_deadline_s": 0.01, "max_round_retries": 1})
        )
    kept = load_latest_round_state(out)
    assert kept.round == 1 and len(kept.history) == 1
