"""Federated LoRA: round overhead, and the federated adapter vs each silo's local-only adapter.

Runs pipelines/configs/federated.debug.yaml (three simulated silos with code, prose and chat
data on one local Ray node, FedAvg with MoE-aware expert weighting, `rounds` x `local_steps`,
adapters on attention and routed experts; its random-weight debug base) with output_dir and base
in a temporary directory, through `raymoe.federated.job.run_federated` as pipelines.federated
does. Round overhead = the round's wall time (instructions out -> aggregated adapter) minus the
slowest silo's local training (silos train concurrently): Ray calls, transfers of the adapter,
update checks and aggregation. Round 1 (first calls into the actors) is shown apart.

Peers, measured in the same run: each silo's local-only adapter, trained as its silo client
trains (AdapterTrainer, same batches in the same order, same learning rate) on its own data only
for the same rounds x local_steps steps, keeping one Adam state throughout (plain local
training); and the base model. All are evaluated on data/sft/silos/heldout.jsonl (20 records per domain) with the
adapter folded into the weights (`merge_adapter`): answer-token loss and greedy exact match.

    python -m bench.bench_federated          # ~70 s on 2 cores; writes bench/results/federated.json
    python -m bench.bench_federated --quick  # 2 rounds x 3 steps (smoke run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.harness import machine_line, print_table, write_results

CONFIG = "pipelines/configs/federated.debug.yaml"
DOMAINS = ("code", "prose", "chat")


def domain_of(messages: list[dict[str, str]]) -> str:
    """The silo domain of a held-out record, from its question (see raymoe.data.silo_tasks)."""
    question = messages[-2]["content"]
    if "```python" in question:
        return "code"
    if question.startswith(("What is the first word", "How many words", "What is the last word")):
        return "prose"
    return "chat"


def start_local_ray(resources: dict[str, float]) -> None:
    """A fresh embedded Ray node with the silos' resources (as `init_ray` starts one).

    address="local": without it ray.init joins the cluster named in /tmp/ray/ray_current_cluster,
    which on a shared machine may be someone else's. No dashboard: nothing here needs it, and
    another cluster on this machine may hold its port.
    """
    import ray

    from raymoe.ray_runtime import LOCAL_ENV

    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        resources=resources,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {k: os.environ[k] for k in LOCAL_ENV}},
    )


def overhead_rows(history: list[dict]) -> list[dict]:
    """Per round: wall seconds, slowest silo's training seconds, overhead seconds and share."""
    rows = []
    for record in history:
        train = max(record["train_seconds"].values())
        over = record["round_seconds"] - train
        rows.append(
            {
                "round": record["round"],
                "round_s": record["round_seconds"],
                "train_s": train,
                "overhead_s": over,
                "share": over / record["round_seconds"],
                "eval_loss": record.get("eval_loss"),
            }
        )
    return rows


def local_only_adapters(cfg) -> dict[str, dict[str, torch.Tensor]]:
    """Each silo's adapter after rounds x local_steps steps on its own data, nothing shared: the
    silo client's step (`SiloClient.fit`) on the same batches in the same order, one Adam state."""
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.data.sft import SFTBatches, load_sft_examples
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.layout import ParallelLayout
    from raymoe.train.adapter_trainer import AdapterTrainer
    from raymoe.train.finetune_worker import answer_tokens, pad_token_id, sft_micro_batch

    tokenizer = ChatTokenizer.from_dir(cfg.base)
    pad = pad_token_id(tokenizer)
    adapters = {}
    for silo in cfg.silos:
        trainer = AdapterTrainer(cfg.base, cfg.lora, cfg.optim, build_groups(ParallelLayout()), seed=cfg.seed)
        examples, _ = load_sft_examples(silo.data_path, tokenizer, cfg.max_seq_len, "left")
        batches = SFTBatches(examples, cfg.local_batch_size, cfg.seed, pad_id=pad)
        for step in range(cfg.rounds * cfg.local_steps):
            chosen = [examples[i] for i in batches.indices(step)]
            trainer.step([sft_micro_batch(chosen, pad)], lr=cfg.optim.lr, global_target_counts=[answer_tokens(chosen)])
        adapters[silo.name] = {k: v.detach().clone() for k, v in trainer.local_tensors().items()}
        print(f"local-only {silo.name}: {cfg.rounds * cfg.local_steps} steps done", flush=True)
    return adapters


def evaluate(model, tokenizer, records: list, max_seq_len: int, max_new_tokens: int) -> dict:
    """Held-out answer loss and exact match, overall and per domain."""
    from raymoe.data.sft import score_exact_match
    from raymoe.train.adapter_eval import answer_loss, greedy_answers

    model.eval()
    predictions = greedy_answers(model, tokenizer, records, max_new_tokens)
    out = {
        "loss": answer_loss(model, tokenizer, records, max_seq_len),
        "exact_match": score_exact_match(predictions, [m[-1]["content"] for m in records]),
    }
    for domain in DOMAINS:
        idx = [i for i, m in enumerate(records) if domain_of(m) == domain]
        out[f"loss_{domain}"] = answer_loss(model, tokenizer, [records[i] for i in idx], max_seq_len)
        out[f"exact_match_{domain}"] = score_exact_match(
            [predictions[i] for i in idx], [records[i][-1]["content"] for i in idx]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 local steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local-only runs and eval")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    import ray

    from raymoe.config import load_config
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.federated.config import FederatedConfig
    from raymoe.federated.job import absolute, run_federated
    from raymoe.models import load_hf
    from raymoe.models.lora import write_peft_adapter
    from raymoe.models.lora_merge import merge_adapter
    from raymoe.train.adapter_eval import read_eval_records

    workdir = tempfile.TemporaryDirectory(prefix="federated-bench-")
    tmp = Path(workdir.name)
    overrides = [f"output_dir={tmp / 'run'}", f"base={tmp / 'base'}", f"debug_base={tmp / 'base'}"]
    if args.quick:
        overrides += ["rounds=2", "local_steps=3"]
    cfg = absolute(load_config(FederatedConfig, CONFIG, overrides))
    start_local_ray({s.resource_name: 1 for s in cfg.silos})
    try:
        summary = run_federated(cfg)
    finally:
        ray.shutdown()
    rounds = overhead_rows(summary["history"])

    torch.set_num_threads(args.threads)
    adapters = {f"local-only {name}": tensors for name, tensors in local_only_adapters(cfg).items()}
    tokenizer = ChatTokenizer.from_dir(cfg.base)
    records = read_eval_records(cfg.eval_path)
    counts = {d: sum(domain_of(m) == d for m in records) for d in DOMAINS}
    if sorted(counts.values()) != [20, 20, 20]:
        raise SystemExit(f"expected 20 held-out records per domain, found {counts}")
    dirs: dict[str, str | Path] = {"base": cfg.base}
    for name, tensors in [("federated (FedAvg, MoE-aware)", None), *adapters.items()]:
        adapter_dir = (
            summary["adapter"]
            if tensors is None
            else write_peft_adapter(tmp / name.replace(" ", "-"), cfg.lora, tensors)
        )
        dirs[name] = merge_adapter(cfg.base, adapter_dir, tmp / f"merged-{len(dirs)}")
    results = {
        name: evaluate(load_hf(path), tokenizer, records, cfg.max_seq_len, args.max_new_tokens)
        for name, path in dirs.items()
    }

    later = rounds[1:] or rounds
    print_table(
        f"Federated round overhead ({len(cfg.silos)} silos, {cfg.local_steps} local steps, "
        f"{cfg.num_threads_per_silo} thread / {cfg.num_cpus_per_silo} CPU per silo)",
        ["round", "round s", "slowest silo training s", "overhead s", "overhead share", "eval loss"],
        [
            [
                r["round"],
                f"{r['round_s']:.2f}",
                f"{r['train_s']:.2f}",
                f"{r['overhead_s']:.3f}",
                f"{100 * r['share']:.1f}%",
                f"{r['eval_loss']:.4f}",
            ]
            for r in rounds
        ],
    )
    mean_over = statistics.mean(r["overhead_s"] for r in later)
    mean_share = statistics.mean(r["share"] for r in later)
    print(
        f"rounds {later[0]['round']}-{later[-1]['round']}: overhead {mean_over:.3f} s per round, "
        f"{100 * mean_share:.1f}% of the round (round 1: {rounds[0]['overhead_s']:.3f} s)"
    )
    print_table(
        f"Held-out ({len(records)} records, 20 per domain) after {cfg.rounds} rounds x {cfg.local_steps} local steps",
        ["adapter", "held-out loss", "exact match", *[f"loss {d}" for d in DOMAINS], *[f"EM {d}" for d in DOMAINS]],
        [
            [
                name,
                f"{r['loss']:.3f}",
                f"{r['exact_match']:.1%}",
                *[f"{r[f'loss_{d}']:.3f}" for d in DOMAINS],
                *[f"{r[f'exact_match_{d}']:.0%}" for d in DOMAINS],
            ]
            for name, r in results.items()
        ],
    )
    fed = results["federated (FedAvg, MoE-aware)"]["loss"]
    beaten = [n for n in adapters if fed < results[n]["loss"]]
    print(
        f"federated held-out loss {fed:.3f} beats {len(beaten)} of {len(adapters)} local-only adapters"
        + ("" if len(beaten) == len(adapters) else f" (not: {sorted(set(adapters) - set(beaten))})")
    )
    print(f"machine: {machine_line()}; torch {torch.__version__}, fp32; load average {os.getloadavg()[0]:.1f}")
    write_results(
        "federated",
        {
            "config": CONFIG,
            "overrides": overrides[3:],
            "rounds": rounds,
            "mean_overhead_s": mean_over,
            "mean_overhead_share": mean_share,
            "overhead_rounds": [later[0]["round"], later[-1]["round"]],
            "heldout": results,
            "federated_beats_all_local": len(beaten) == len(adapters),
            "machine_line": machine_line(),
            "load_average_1m": os.getloadavg()[0],
        },
    )
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
