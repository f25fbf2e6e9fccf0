"""MLA decode against context length, and against transformers' DeepseekV3 on the same weights.

A DeepSeek-V3-shaped model at the peers' tiny shape (d512, 8 layers, 8 routed experts top-2 + 1
shared, F1024, vocab 32000; MLA with kv_lora_rank 128, nope 64 / rope 32 / v 64 per head, 8 heads,
no query compression) decodes greedily at batch 1 after a 128-token and a 2048-token context.
raymoe's one-token decode absorbs kv_b_proj (attention over the cached latent itself), so its
per-token cost should barely grow with context; transformers' DeepseekV3 re-expands every cached
position at every step. Reported: decode tokens/s (decode only, prefill excluded) for both at
both contexts, raymoe 2048/128, raymoe/transformers at 2048, and whether the greedy tokens agree.

Weights are drawn with std 1/sqrt(dim) (as `raymoe.serve.debug_artifact` does) so greedy decoding
is decided by the model, not by rounding noise between two implementations.

Run: `python -m bench.bench_mla_decode [--quick]`; writes bench/results/mla_decode.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from bench.harness import machine_line, print_table, write_results
from raymoe.models import KVCache, load_hf
from raymoe.models.generate import decode_step, prefill

VOCAB, DIM = 32000, 512


def model_pair(max_context: int):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=1024,
        moe_intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=max_context,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    reference = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_hf(tmp).eval()
    return reference, ours


@torch.inference_mode()
def raymoe_decode(model, context_1T: torch.Tensor, new: int) -> tuple[list[int], float]:
    """Greedy tokens after `context` and decode tokens/s (prefill not timed)."""
    T = context_1T.shape[1]
    cache = KVCache(model.cfg, num_slots=1, max_seq_len=T + new)
    slots = torch.zeros(1, dtype=torch.long)
    token = prefill(model, context_1T, cache, slots).argmax(-1)
    tokens = [int(token)]
    start = time.perf_counter()
    for i in range(new - 1):
        token = decode_step(model, token, torch.tensor([T + i]), cache, slots).argmax(-1)
        tokens.append(int(token))
    return tokens, (new - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def transformers_decode(model, context_1T: torch.Tensor, new: int) -> tuple[list[int], float]:
    out = model(context_1T, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens, (new - 1) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512-token long context, 16 new tokens")
    args = parser.parse_args(argv)
    short, long, new = (128, 512, 16) if args.quick else (128, 2048, 32)
    print(machine_line(), flush=True)
    reference, ours = model_pair(long + new)
    rows, results = [], {}
    for context in (short, long):
        ids = torch.randint(2, VOCAB, (1, context), generator=torch.Generator().manual_seed(context))
        our_tokens, our_tps = raymoe_decode(ours, ids, new)
        ref_tokens, ref_tps = transformers_decode(reference, ids, new)
        results[context] = {
            "raymoe_tok_s": our_tps,
            "transformers_tok_s": ref_tps,
            "same_greedy_tokens": our_tokens == ref_tokens,
        }
        rows.append([context, our_tps, ref_tps, our_tps / ref_tps, our_tokens == ref_tokens])
    print_table(
        f"MLA decode, batch 1, {new} greedy tokens, fp32, {torch.get_num_threads()} threads",
        ["context", "raymoe tok/s", "transformers tok/s", "raymoe / transformers", "same tokens"],
        rows,
    )
    growth = results[long]["raymoe_tok_s"] / results[short]["raymoe_tok_s"]
    print(
        f"raymoe tok/s at {long} over {short} context: {growth:.2f} (target >= 0.7); "
        f"raymoe / transformers at {long}: {rows[1][3]:.2f} (target >= 2)"
    )
    write_results("mla_decode", {"contexts": results, "growth": growth, "cpu": machine_line()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
