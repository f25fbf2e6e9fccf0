"""Model-core benchmarks against transformers on the same weights, same threads, same run.

1. MoE layer forward+backward tokens/s vs transformers' MixtralSparseMoeBlock
   (d512, 8 experts top-2, F1024, 4096 tokens).
2. Full train step (batch 8 x seq 512, fused AdamW for both) tokens/s and MFU vs MixtralForCausalLM at the same
   config (d512, 8 layers, 8 experts top-2, F1024, vocab 32000), in fp32 and under bf16 autocast
   for both sides, then each side at its faster dtype (target >= 1.3x). raymoe's side is the
   trainer's own `train_step`. MFU = model FLOP/s over the GEMM peak of the row's dtype, measured
   in this run.
3. Greedy decode tokens/s at batch 1 and 8 (prompt 128, 128 new tokens) vs `generate`, with
   PyTorch's default kernels and with oneDNN-packed weights (the serving engine's default).

Run: `python -m bench.bench_model [--quick]` (or `make bench`); writes bench/results/model.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from bench.harness import best_seconds, gemm_peak_flops, print_table, run_line, write_results
from raymoe.inference.packed import pack_onednn
from raymoe.models import load_hf
from raymoe.models.generate import generate


def mixtral_pair(num_layers: int, vocab: int, seq: int):
    """A transformers Mixtral and the raymoe model loaded from its saved weights."""
    torch.manual_seed(0)
    # attn_implementation: a PreTrainedConfig keyword that MixtralConfig's dataclass fields do not list.
    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=max(seq, 512) * 2,
        attn_implementation="sdpa",
    )
    reference = MixtralForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_hf(tmp)
    return reference, ours


def train_flops_per_token(model, seq: int) -> float:
    """6 x active matmul parameters + causal attention score/value FLOPs, per token (fwd+bwd)."""
    cfg = model.cfg
    matmul = model.num_params(active=True) - model.embed.weight.numel()
    matmul -= sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1 or "router" in n)
    attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq  # QK^T and AV, causal half
    return 6 * matmul + 3 * attention


def bench_moe_layer(tokens: int) -> list:
    reference, ours = mixtral_pair(num_layers=1, vocab=1000, seq=64)
    ref_block = next(m for m in reference.modules() if type(m).__name__ == "MixtralSparseMoeBlock")
    our_block = next(ours.moe_layers()).train()
    x = torch.randn(1, tokens, 512)
    with torch.no_grad():
        assert (ref_block(x) - our_block(x)).abs().max() < 1e-4, "MoE blocks disagree"

    def step(block):
        xg = x.clone().requires_grad_(True)
        block(xg).square().mean().backward()

    ref_s = best_seconds(lambda: step(ref_block))
    our_s = best_seconds(lambda: step(our_block))
    return ["MoE layer fwd+bwd (tokens/s)", tokens / our_s, tokens / ref_s, ref_s / our_s]


def bench_train_step(batch: int, seq: int, num_layers: int) -> tuple[list[list], dict]:
    """Train-step rows: raymoe's trainer step (`raymoe.train.step.train_step`) against a plain
    transformers step, each in fp32 and under bf16 autocast (fp32 weights and AdamW state), then
    each side at its faster dtype. MFU is over the GEMM peak of the dtype a row ran in."""
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.layout import ParallelLayout
    from raymoe.precision import resolve_precision
    from raymoe.train.step import train_step

    reference, ours = mixtral_pair(num_layers=num_layers, vocab=32000, seq=seq)
    ids = torch.randint(0, 32000, (batch, seq + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    # The same optimizer for both (fused AdamW, as raymoe's trainer and transformers' Trainer
    # default to), so the ratio measures the models.
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-4, fused=True)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    reference.train()
    groups = build_groups(ParallelLayout(ep=1, dp=1))

    def ref_step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reference(inputs, labels=ids[:, :-1]).loss
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    def our_step(bf16: bool):
        # What every raymoe training worker runs: autocast, loss, backward, clip, AdamW, bias.
        train_step(ours, our_opt, [(inputs, targets)], groups=groups, lr=1e-4, clip_norm=1.0, bf16=bf16)

    tokens = batch * seq
    flops = train_flops_per_token(ours, seq) * tokens
    seconds: dict[tuple[str, str], float] = {}
    for dtype in ("fp32", "bf16"):
        bf16 = dtype == "bf16"
        seconds["transformers", dtype] = best_seconds(functools.partial(ref_step, bf16), repeats=2)
        seconds["raymoe", dtype] = best_seconds(functools.partial(our_step, bf16), repeats=2)
    # Peaks measured after the steps: one taken while something else held the cores would
    # inflate MFU.
    peaks = {"fp32": gemm_peak_flops(), "bf16": gemm_peak_flops(dtype=torch.bfloat16)}
    rows = []
    for dtype in ("fp32", "bf16"):
        ours_s, ref_s = seconds["raymoe", dtype], seconds["transformers", dtype]
        rows.append([f"train step, {dtype} (tokens/s)", tokens / ours_s, tokens / ref_s, ref_s / ours_s])
    best = {side: min(("fp32", "bf16"), key=lambda d: seconds[side, d]) for side in ("raymoe", "transformers")}
    ours_s, ref_s = seconds["raymoe", best["raymoe"]], seconds["transformers", best["transformers"]]
    rows.append(
        [
            f"train step, each at its faster dtype (raymoe {best['raymoe']}, transformers {best['transformers']})",
            tokens / ours_s,
            tokens / ref_s,
            ref_s / ours_s,
        ]
    )
    mfu = {
        f"{side} {dtype}": flops / seconds[side, dtype] / peaks[dtype]
        for side in ("raymoe", "transformers")
        for dtype in ("fp32", "bf16")
    }
    info = {
        "mfu": mfu,
        "gemm_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
        "best_dtype": best,
        "auto_precision": resolve_precision("auto", "cpu").describe(),
        "best_ratio": ref_s / ours_s,
    }
    return rows, info


def bench_decode(batch: int, prompt: int, new: int, num_layers: int) -> tuple[list[list], float]:
    """Rows for raymoe's `generate` with PyTorch's default kernels (as transformers runs) and with
    oneDNN-packed weights (what the serving engine runs, `engine.cpu_kernels: onednn`)."""
    reference, ours = mixtral_pair(num_layers=num_layers, vocab=32000, seq=prompt + new)
    packed = pack_onednn(copy.deepcopy(ours))
    ids = torch.randint(3, 32000, (batch, prompt))
    ref_out = reference.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    agree = min(
        (ref_out[:, prompt:] == generate(m, ids, max_new_tokens=new)).float().mean().item() for m in (ours, packed)
    )
    ref_s = best_seconds(
        lambda: reference.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0),
        repeats=2,
    )
    tokens = batch * new
    rows = []
    for label, model in (
        (f"decode batch {batch} (tokens/s)", ours),
        (f"decode batch {batch}, packed weights (tokens/s)", packed),
    ):
        our_s = best_seconds(functools.partial(generate, model, ids, max_new_tokens=new), repeats=2)
        rows.append([label, tokens / our_s, tokens / ref_s, ref_s / our_s])
    return rows, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = run_line(
        "fp32, train rows also bf16 autocast (fp32 weights); packed rows: oneDNN-packed fp32 weights", args.threads
    )
    print(machine, flush=True)
    q = args.quick
    rows = [bench_moe_layer(tokens=1024 if q else 4096)]
    train_rows, train = bench_train_step(batch=2 if q else 8, seq=128 if q else 512, num_layers=2 if q else 8)
    rows += train_rows
    agreement = {}
    for batch in (1, 8):
        decode_rows, agreement[batch] = bench_decode(batch, prompt=128, new=32 if q else 128, num_layers=2 if q else 8)
        rows += decode_rows
    header = ["measure", "raymoe", "transformers", "ratio (raymoe / transformers)"]
    table = print_table(f"Model core vs transformers ({args.threads} threads)", header, rows)
    peaks = train["gemm_peak_gflops"]
    print(
        f"\nGEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; train MFU (over the "
        "peak of its dtype): " + ", ".join(f"{k} {v:.1%}" for k, v in train["mfu"].items()) + "\n"
        f"train.precision auto here: {train['auto_precision']}; train step at each side's faster dtype: "
        f"{train['best_ratio']:.2f}x (target >= 1.3)\n"
        f"greedy decode token agreement b1 {agreement[1]:.0%}, b8 {agreement[8]:.0%}"
    )
    write_results(
        "model",
        {
            "quick": q,
            "rows": [dict(zip(header, r)) for r in rows],
            "table": table,
            "gemm_peak_gflops": peaks,
            "train_mfu": train["mfu"],
            "train_best_dtype": train["best_dtype"],
            "train_auto_precision": train["auto_precision"],
            "decode_agreement": agreement,
            "machine_line": machine,
        },
    )


if __name__ == "__main__":
    main()
