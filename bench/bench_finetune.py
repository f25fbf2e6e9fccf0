"""LoRA fine-tuning tokens/s: raymoe's AdapterTrainer vs peft + transformers on the same work.

Both sides train a rank-8 adapter (alpha 16) on q/k/v/o_proj of every layer of the same HF
artifact (the standard bench shape, a tiny Mixtral: d512, 8 layers, 8 experts top-2, expert
hidden 1024, vocab 32000, random weights, its tokenizer trained on the SFT texts; `--quick`: d128 x
4 layers), on the same batches of data/sft/function_qa/train.jsonl (max_seq_len 256, batch 8,
built as `run_finetune_worker` builds them), in fp32 with the same torch threads, AdamW (lr 2e-3,
betas 0.9/0.95, no weight decay), global-norm clipping at 1.0, loss = mean cross-entropy over
answer tokens. The peer starts from raymoe's initial adapter (copied in), so both sides follow
the same trajectory; their first-step losses (B = 0: the base model's loss) must agree or the run
fails. Peer rows: `AutoModelForCausalLM` + `peft.get_peft_model`, fp32, and with
`torch.autocast("cpu", bfloat16)` when the CPU has avx512_bf16 or AMX. Also a raymoe row with
per-expert adapters (`routed_experts`; peft cannot target transformers 5's fused experts).
Tokens = non-padding input tokens. Rows alternate over `--rounds` of the same batches; best round counts.
Reports tokens/s per row and raymoe / best peer (target >= 1.3).

    python -m bench.bench_finetune            # ~2.5 min on 2 cores; writes bench/results/finetune.json
    python -m bench.bench_finetune --quick    # small model, fewer steps (~15 s)
    python -m bench.bench_finetune --profile  # also the top ops of one raymoe step
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import cpu_model_and_flags, machine_line, print_table, write_results

TARGET = 1.3
DATA = "data/sft/function_qa/train.jsonl"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_artifact(path: Path, data_path: str, vocab_size: int, **shape) -> Path:
    """A random-weight Mixtral artifact of `shape` (debug_config fields) with a tokenizer trained
    on `data_path`'s lines (its vocabulary may be smaller than the model's)."""
    from raymoe.serve.debug_artifact import make_debug_artifact

    with open(data_path, encoding="utf-8") as lines:
        texts = [line for line in lines if line.strip()]
    return make_debug_artifact(
        path, seed=0, vocab_size=min(vocab_size, 4096), corpus=texts, model_vocab_size=vocab_size, **shape
    )


def load_steps(artifact: str, data_path: str, max_seq_len: int, batch: int, count: int, seed: int = 0) -> list[dict]:
    """The first `count` optimizer steps' batches, exactly as `run_finetune_worker` builds them
    (one process): {"micro": (input_ids_BT, targets_BT, real_BT), "answers": int, "tokens": int}."""
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.data.sft import SFTBatches, load_sft_examples
    from raymoe.train.finetune_worker import answer_tokens, pad_token_id, sft_micro_batch

    tokenizer = ChatTokenizer.from_dir(artifact)
    examples, _ = load_sft_examples(data_path, tokenizer, max_seq_len, "left")
    pad = pad_token_id(tokenizer)
    batches = SFTBatches(examples, batch, seed, pad_id=pad)
    steps = []
    for step in range(count):
        chosen = [examples[i] for i in batches.indices(step)]
        steps.append(
            {
                "micro": sft_micro_batch(chosen, pad),
                "answers": answer_tokens(chosen),
                "tokens": sum(len(e.input_ids) - 1 for e in chosen),
            }
        )
    return steps


def optim_config():
    from raymoe.train.config import OptimConfig

    return OptimConfig(lr=2e-3, warmup_steps=0, weight_decay=0.0, beta1=0.9, beta2=0.95, clip_norm=1.0)


def raymoe_side(artifact: str, routed_experts: bool = False):
    """(AdapterTrainer, step(batch) -> loss) as `run_finetune_worker` runs one process."""
    from raymoe.models.lora import LoRAConfig
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.layout import ParallelLayout
    from raymoe.train.adapter_trainer import AdapterTrainer

    lora = LoRAConfig(rank=8, alpha=16.0, attention_modules=ATTENTION, routed_experts=routed_experts)
    optim = optim_config()
    trainer = AdapterTrainer(artifact, lora, optim, build_groups(ParallelLayout()), seed=0)

    def step(batch: dict) -> float:
        return trainer.step([batch["micro"]], lr=optim.lr, global_target_counts=[batch["answers"]]).loss

    return trainer, step


def peer_side(artifact: str, initial: dict[str, torch.Tensor], bf16: bool):
    """(peft model, step(batch) -> loss): transformers + peft LoRA on the same targets, started
    from raymoe's initial adapter, trained on the same (already shifted) targets."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    base = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, lora_dropout=0.0))
    loaded = set_peft_model_state_dict(model, initial)
    # peft returns torch's load_state_dict result, a namedtuple its types leave untyped.
    unexpected = loaded.unexpected_keys  # type: ignore[attr-defined]
    if unexpected:
        raise RuntimeError(f"peft model has no module for {unexpected[:3]}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = optim_config()
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    def step(batch: dict) -> float:
        input_ids_BT, targets_BT, _ = batch["micro"]
        optimizer.zero_grad(set_to_none=True)
        # Right padding under causal attention changes no real token, so no attention_mask is needed
        # (none lets transformers keep SDPA's is_causal path); use_cache=False as for training.
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            logits_BTV = model(input_ids=input_ids_BT, use_cache=False).logits
        loss = peer_loss(logits_BTV, targets_BT, batch["answers"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        optimizer.step()
        return float(loss.detach())

    return model, step


def peer_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, answers: int) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; targets are already shifted (`collate`), so position t
    is scored against targets_BT[:, t] with no further shift (transformers' own would shift twice)."""
    flat = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
    return F.cross_entropy(flat, targets_BT.reshape(-1), ignore_index=-100, reduction="sum") / max(answers, 1)


def timed(step, batches: list[dict]) -> tuple[float, list[float], list[float]]:
    """(tokens/s, per-step seconds, losses) over `batches`."""
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        losses.append(step(batch))
        seconds.append(time.perf_counter() - start)
    return sum(b["tokens"] for b in batches) / sum(seconds), seconds, losses


def profile_step(step, batch: dict, vocab_size: int, rows: int = 10) -> str:
    """Top ops (with input shapes) of one step by self CPU time, and the share spent on tensors
    with a vocabulary dimension (output projection, its backward, log-softmax, the loss)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(batch)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    vocab = sum(e.self_cpu_time_total for e in events if any(vocab_size in s for s in e.input_shapes if s))
    lines = [
        f"one raymoe step, input {tuple(batch['micro'][0].shape)}: {total / 1e3:.0f} ms self CPU, "
        f"{100 * vocab / total:.0f}% on (tokens x vocab {vocab_size}) tensors; top ops:"
    ]
    lines += [
        f"{100 * e.self_cpu_time_total / total:5.1f}% {e.self_cpu_time_total / 1e3:7.1f} ms x{e.count:<4d} "
        f"{e.key} {e.input_shapes}"
        for e in events[:rows]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d128 x 4 layers, 6 timed steps")
    parser.add_argument("--artifact", default="", help="an HF-format artifact instead of a random one")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per row and round (default 12, quick 6)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one raymoe step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (6 if args.quick else 12)
    shape = dict(dim=128, num_layers=4) if args.quick else dict(dim=512, num_layers=8)
    vocab = 4096 if args.quick else 32000

    workdir = tempfile.TemporaryDirectory(prefix="finetune-bench-")  # the artifact is ~0.5 GB
    tmp = Path(workdir.name)
    artifact = args.artifact or str(make_artifact(tmp / "base", DATA, vocab, max_seq_len=args.max_seq_len, **shape))
    # Every row runs the same batches in every round: each timed round is the same work.
    batches = load_steps(artifact, DATA, args.max_seq_len, args.batch, args.warmup + steps)

    trainer, ours = raymoe_side(artifact)
    initial = {k: v.detach().clone() for k, v in trainer.local_tensors().items()}
    _, ours_routed = raymoe_side(artifact, routed_experts=True)
    sides = {
        "raymoe fp32": ours,
        "raymoe fp32, + routed-expert adapters": ours_routed,
        "peft + transformers fp32": peer_side(artifact, initial, bf16=False)[1],
    }
    if cpu_model_and_flags()[1] & {"avx512_bf16", "amx_bf16"}:
        sides["peft + transformers bf16 autocast"] = peer_side(artifact, initial, bf16=True)[1]
    peers = [n for n in sides if n.startswith("peft")]

    best: dict[str, float] = {}
    losses: dict[str, list[float]] = {n: [] for n in sides}
    for r in range(args.rounds):
        # Alternating rows, best round of each: a neighbour's burst hits one round, not the ratio.
        for name, step in sides.items():
            warm = [step(b) for b in batches[: args.warmup]]
            tps, _, timed_losses = timed(step, batches[args.warmup :])
            losses[name] += warm + timed_losses
            best[name] = max(best.get(name, 0.0), tps)
            print(f"round {r + 1}: {name}: {tps:.0f} tokens/s", flush=True)

    # Same base, same batch, B = 0 on both: the first loss is the base model's on that batch.
    first = {n: v[0] for n, v in losses.items()}
    for name in peers:
        tol = 2e-2 if "bf16" in name else 1e-4
        if abs(first[name] - first["raymoe fp32"]) > tol * abs(first["raymoe fp32"]):
            raise SystemExit(
                f"first-step losses differ: raymoe {first['raymoe fp32']:.6f}, {name} "
                f"{first[name]:.6f} (relative tolerance {tol}): the workloads do not match"
            )
    drift = max(abs(a - b) for a, b in zip(losses["raymoe fp32"], losses["peft + transformers fp32"]))
    peer_best = max(peers, key=lambda name: best[name])
    ratio = best["raymoe fp32"] / best[peer_best]
    tokens = sum(b["tokens"] for b in batches[args.warmup :])
    size = f"d{shape['dim']} x {shape['num_layers']} layers" if not args.artifact else args.artifact
    rows = [
        [n, f"{best[n]:.0f}", f"{best[n] / best[peer_best]:.2f}", f"{first[n]:.4f}", f"{losses[n][-1]:.4f}"]
        for n in sides
    ]
    print_table(
        f"LoRA fine-tuning ({size}, batch {args.batch}, max_seq_len {args.max_seq_len}, "
        f"{steps} timed steps = {tokens} tokens, best of {args.rounds} rounds)",
        ["setup", "tokens/s", "vs best peer", "first-step loss", "last loss"],
        rows,
    )
    print(
        f"machine: {machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fp32 unless the row says bf16; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"ratio raymoe / {peer_best}: {ratio:.2f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}); "
        f"fp32 loss trajectories differ by at most {drift:.2e} over {len(losses['raymoe fp32'])} steps"
    )
    if args.profile:
        print(profile_step(ours, batches[0], trainer.model.cfg.vocab_size))
    write_results(
        "finetune",
        {
            "model": size,
            "batch": args.batch,
            "max_seq_len": args.max_seq_len,
            "steps": steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "timed_tokens": tokens,
            "machine_line": machine_line(),
            "tokens_per_s": best,
            "first_step_loss": first,
            "peer_best": peer_best,
            "ratio": ratio,
            "target_ratio": TARGET,
            "fp32_loss_max_difference": drift,
            "load_average_1m": os.getloadavg()[0],
        },
    )
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
