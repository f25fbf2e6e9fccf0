"""The federated job as the driver runs it: place silo actors, run the server, write the adapter.

Silo actors are placed by their custom resource (one unit each), so each lands on a node that
belongs to its silo; the driver waits for them with a deadline and names a silo that no node
can host. The driver builds the base model only for its own held-out evaluation; it never opens
a silo's data path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from raymoe.atomic_io import atomic_write_json
from raymoe.config import ConfigError, from_dict, to_dict
from raymoe.federated.config import FederatedConfig
from raymoe.federated.server import FederatedJobFailed


def absolute(cfg: FederatedConfig) -> FederatedConfig:
    """Local paths made absolute (actors run in their own directories)."""
    data = cfg.to_dict()
    for key in ("base", "debug_base", "output_dir", "eval_path"):
        if data[key]:
            data[key] = os.path.abspath(data[key])
    for silo in data["silos"]:
        silo["data_path"] = os.path.abspath(silo["data_path"])
    return from_dict(FederatedConfig, data)


def check_before_launch(cfg: FederatedConfig) -> None:
    """The server's own files: the base artifact (unless the debug base is to be written there)
    and eval_path; and, when the silos are simulated on this machine (no RAY_ADDRESS), their data.

    On a cluster silo data paths are not checked here: they live on the silos' nodes, and the
    server never opens them; a silo whose file is missing fails at start with the path in its
    message.
    """
    if os.path.isfile(os.path.join(cfg.base, "config.json")) or not cfg.writes_debug_base:
        from raymoe.artifact_check import check_artifact
        from raymoe.models import read_hf_config
        from raymoe.train.finetune_config import check_lora_fits

        check_artifact("base", cfg.base)
        check_lora_fits(read_hf_config(cfg.base)[0], cfg.lora)
    if cfg.eval_path and not os.path.isfile(cfg.eval_path):
        raise ConfigError(f"eval_path={cfg.eval_path!r} is not a file")
    if cfg.writes_debug_base and not cfg.eval_path:
        raise ConfigError(
            f"base={cfg.base!r} holds no artifact and the debug base written there "
            "trains its tokenizer on eval_path, which is not set"
        )
    if not os.environ.get("RAY_ADDRESS"):
        for i, silo in enumerate(cfg.silos):
            if not os.path.isfile(silo.data_path):
                raise ConfigError(f"silos[{i}].data_path={silo.data_path!r} is not a file (silo {silo.name!r})")


def start_silos(cfg: FederatedConfig) -> dict[str, Any]:
    """One SiloClient actor per silo on a node offering its resource; waits until all are up."""
    import ray

    from raymoe.federated.silo import SiloClient

    actor_cls = ray.remote(SiloClient)
    # Any: Ray's types do not give a handle of a `ray.remote(cls)` actor its methods' `.remote`.
    actors: dict[str, Any] = {
        s.name: actor_cls.options(
            name=f"{cfg.name}-silo-{s.name}",
            num_cpus=cfg.num_cpus_per_silo,
            resources={s.resource_name: 1},
            max_restarts=0,
        ).remote(
            s.name,
            s.data_path,
            cfg.base,
            to_dict(cfg.lora),
            to_dict(cfg.optim),
            cfg.max_seq_len,
            cfg.local_batch_size,
            cfg.seed,
            cfg.num_threads_per_silo,
            cfg.local_optimizer_state == "reset",
        )
        for s in cfg.silos
    }
    refs = {s.name: actors[s.name].describe.remote() for s in cfg.silos}
    _ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=cfg.faults.silo_start_timeout_s)
    if pending:
        for actor in actors.values():
            ray.kill(actor)
        waiting = [s for s in cfg.silos if refs[s.name] in pending]
        raise FederatedJobFailed(
            f"silo(s) {[s.name for s in waiting]} did not start within faults.silo_start_timeout_s="
            f"{cfg.faults.silo_start_timeout_s}: no node offers resource(s) "
            f"{[s.resource_name for s in waiting]} (give the silo's nodes `--resources` or a KubeRay "
            "worker group with that resource)"
        )
    described = {}
    for s in cfg.silos:
        try:
            described[s.name] = ray.get(refs[s.name])
        except ray.exceptions.RayError as exc:
            for actor in actors.values():
                ray.kill(actor)
            cause = str(exc).strip().splitlines()[-1]
            raise FederatedJobFailed(f"silo {s.name} could not start on its node: {cause}") from None
    for name, info in described.items():
        print(
            f"silo {name}: {info['examples']} examples ({info['quarantined']} quarantined) on node "
            f"{info['node_id'][:12]}",
            flush=True,
        )
    return {"actors": actors, "described": described}


def build_evaluation(cfg: FederatedConfig):
    """(initial adapter, evaluate(params) -> held-out answer loss or None)."""
    import torch

    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.models import load_hf
    from raymoe.models.lora import add_trainable_lora, lora_state, set_lora_state
    from raymoe.train.adapter_eval import answer_loss, read_eval_records

    torch.set_num_threads(max(1, cfg.num_threads_per_silo))
    model = load_hf(cfg.base)
    add_trainable_lora(model, cfg.lora, seed=cfg.seed)
    initial = {k: v.clone() for k, v in lora_state(model).items()}
    if not cfg.eval_path:
        return initial, None
    tokenizer = ChatTokenizer.from_dir(cfg.base)
    records = read_eval_records(cfg.eval_path)
    model.eval()

    def evaluate(params) -> float:
        set_lora_state(model, params)
        return answer_loss(model, tokenizer, records, cfg.max_seq_len)

    return initial, evaluate


def run_federated(
    cfg: FederatedConfig, on_round_start: Callable[[int, list[str]], None] | None = None
) -> dict[str, Any]:
    """Runs (or resumes) the federated job; returns the summary also written to metrics.json."""
    from raymoe.federated.server import FederatedServer, output_paths
    from raymoe.models import read_hf_config
    from raymoe.models.lora import write_peft_adapter

    cfg = absolute(cfg)
    check_before_launch(cfg)
    if cfg.writes_debug_base and not os.path.isfile(os.path.join(cfg.base, "config.json")):
        from raymoe.serve.debug_artifact import make_debug_artifact

        # The server's own held-out file trains the debug tokenizer; silo data stays unread.
        with open(cfg.eval_path, encoding="utf-8") as fh:
            texts = [line for line in fh if line.strip()]
        make_debug_artifact(cfg.base, seed=cfg.seed, vocab_size=1024, corpus=texts, max_seq_len=512)
    initial, evaluate = build_evaluation(cfg)
    silos = start_silos(cfg)
    try:
        model_cfg, _ = read_hf_config(cfg.base)
        server = FederatedServer(
            cfg,
            silos["actors"],
            initial,
            (model_cfg.num_layers, model_cfg.moe.num_experts),
            evaluate=evaluate,
            on_round_start=on_round_start,
        )
        if evaluate is not None and server.state.round == 0:
            print(f"round 0: eval loss {evaluate(initial):.4f}", flush=True)
        state = server.run()
    finally:
        import ray

        # The silos' resources are free again at once (and their names, for a rerun).
        for actor in silos["actors"].values():
            ray.kill(actor)
    paths = output_paths(cfg)
    write_peft_adapter(paths["adapter"], cfg.lora, state.params)
    summary = {
        "adapter": paths["adapter"],
        "rounds": state.round,
        "history": state.history,
        "silos": silos["described"],
    }
    atomic_write_json(paths["metrics"], summary)
    return summary
