"""Capacity planner: parameter counts against published totals, DeepSeek's and SGLang's published
deployment units checked by the planner's arithmetic, hand-worked roofline terms, the CLI.

Published numbers used here:
- DeepSeek-V3: 671B total, 37B active (DeepSeek-V3 technical report, arXiv 2412.19437);
  README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: 36.7B active for the main model.
- Mixtral-8x7B: 46.7B total, 12.9B used per token (Mistral AI, "Mixtral of experts", Dec 2023).
- DeepSeek Day-6 overview (deepseek-ai/open-infra-index, 202502OpenSourceWeek/
  day_6_one_more_thing_deepseekV3R1_inference_system_overview.md): prefill units of 4 nodes,
  EP32, 32 redundant experts, 9 routed experts per GPU; decode units of 18 nodes, EP144, 2 routed
  experts per GPU; ~14.8k output tokens/s per H800 node; average KV length 4,989 tokens.
  LMSYS's table puts DeepSeek's decode batch at 128 per GPU and prefill at 16,384 tokens per GPU.
- LMSYS, "Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96 H100
  GPUs" (lmsys.org/blog/2025-05-05-large-scale-ep): prefill on 4 nodes (EP32), decode on 9 nodes
  (EP72) of 8 x H100, 288 expert slots; decode 22,282 tokens/s per node at 256 sequences per GPU
  with 2,000-token inputs.

The roofline estimate is an upper bound (no launch gaps, perfect overlap, perfect balance): the
stated factor is that a published throughput lies between 1/3 of the estimate and the estimate.
"""

import argparse
import json

import pytest

from raymoe.deploy.fleet import FLEETS, load_fleet
from raymoe.deploy.plan_cli import add_plan_command
from raymoe.deploy.planner import PLAN_SCHEMA, PlanConfig, plan, redundant_experts
from raymoe.deploy.roofline import (
    Layout,
    RooflineConfig,
    all_to_all_bytes,
    decode_step,
    memory_per_gpu,
    model_sizes,
    prefill_step,
)
from raymoe.models.config import flavour

FP8 = RooflineConfig(weight_dtype="fp8")
BF16 = RooflineConfig(weight_dtype="bf16")
STATED_FACTOR = 3.0


def within(value: float, published: float, tolerance: float) -> bool:
    return abs(value - published) <= tolerance * published


def test_parameter_counts_match_published_totals():
    v3, mixtral = model_sizes(flavour("deepseek-v3")), model_sizes(flavour("mixtral-8x7b"))
    assert within(v3.total_params, 671e9, 0.01)
    assert within(mixtral.total_params, 46.7e9, 0.01)
    # Mistral counts every weight a token touches, embedding table included: 12.88B.
    assert within(mixtral.active_params, 12.9e9, 0.01)
    # DeepSeek-V3: every weight a token touches is 37.55B, 1.5% above the report's rounded 37B.
    # Without the input embedding (a row lookup, 0.93B) it is 36.62B, 0.2% from README_WEIGHTS'
    # 36.7B (which says it includes the embedding; the two published figures disagree by 0.8%).
    assert within(v3.active_params, 37e9, 0.02)
    without_lookup = v3.active_params - 129280 * 7168
    assert within(without_lookup, 36.7e9, 0.01)


def test_hand_worked_sizes():
    v3 = model_sizes(flavour("deepseek-v3"))
    # MLA caches the 512-d latent + 64-d rope key per layer: (512 + 64) x 61 layers x 2 bytes.
    assert v3.kv_bytes_per_token("bf16") == 70_272
    # FP8 dispatch: 8 rows x 7168 bytes + one fp32 scale per 128 values; BF16 combine: 8 x 7168 x 2.
    assert all_to_all_bytes(v3, FP8) == (8 * 7168 + 8 * 7168 / 128 * 4, 8 * 7168 * 2)
    mixtral = model_sizes(flavour("mixtral-8x7b"))
    # GQA: keys and values, 8 kv heads x 128 dims x 32 layers x 2 bytes.
    assert mixtral.kv_bytes_per_token("bf16") == 2 * 8 * 128 * 32 * 2
    # Under attention tp, MLA's latent sits on every rank; GQA's 4 kv heads (Qwen3) split over up
    # to 4 ranks and are copied twice over 8.
    qwen3 = model_sizes(flavour("qwen3-30b-a3b"))
    assert (v3.kv_copies(4), qwen3.kv_copies(2), qwen3.kv_copies(8)) == (4, 1.0, 2.0)


def test_decode_step_is_memory_bound_at_batch_one_by_hand():
    # Mixtral-8x7B in BF16 on one H200: one sequence's token goes to 2 of the 8 experts in each of
    # 32 layers, so the experts' GEMMs read 2 x 3 x 4096 x 14336 x 32 x 2 bytes = 22.55 GB at
    # 4.8 TB/s x 0.9 -> 5.22 ms. At 64 sequences nearly every expert gets a token:
    # 1 - (6/8)^64 = 1 - 1e-8 of the 8.
    sizes = model_sizes(flavour("mixtral-8x7b"))
    step = decode_step(sizes, load_fleet("h200"), Layout(ep=1, num_slots=8), BF16, batch=1, context=100)
    assert step.experts_s == pytest.approx(2 * 3 * 4096 * 14336 * 32 * 2 / (4.8e12 * 0.9))
    assert step.comm_s == 0.0
    step = decode_step(sizes, load_fleet("h200"), Layout(ep=1, num_slots=8), BF16, batch=64, context=100)
    assert step.experts_s == pytest.approx(8 * 3 * 4096 * 14336 * 32 * 2 / (4.8e12 * 0.9), rel=1e-6)


def test_cpu_fleet_plans_fp32_by_hand():
    from raymoe.deploy.cpu_fleet import cpu_fleet, cpu_roofline

    # A CPU measured at 100 GFLOP/s fp32 and 20 GB/s read, serving the `small` flavour in fp32.
    # At one sequence the dense matmuls (head included, fp32 like the rest) take their weights'
    # bytes / 20 GB/s: memory-bound, since 2 FLOPs per 4-byte weight is far below the machine's
    # 100e9 / 20e9 = 5 FLOPs per byte.
    fleet = cpu_fleet(cpu="test", memory_gb=24, fp32_flops=100e9, bf16_flops=50e9, read_bytes_per_s=20e9)
    sizes = model_sizes(flavour("small"))
    step = decode_step(sizes, fleet, Layout(ep=1, num_slots=16), cpu_roofline(), batch=1, context=100)
    dense_bytes = (sizes.dense_params - sizes.embed_params) * 4 + sizes.head_params * 4
    assert step.dense_s == pytest.approx(dense_bytes / 20e9)
    # One token: 2 of 16 experts in each of 7 MoE layers, each 3 x 512 x 512 fp32 weights.
    assert step.experts_s == pytest.approx(2 / 16 * 16 * 3 * 512 * 512 * 7 * 4 / 20e9)
    assert fleet.peak_flops("fp32") == 100e9 and fleet.gpus_per_node == 1
    with pytest.raises(ValueError, match="fleet cpu has no peak for dtype 'fp8'"):
        fleet.peak_flops("fp8")


def test_deepseek_units_per_gpu_expert_counts():
    # "each GPU handles 9 routed experts" (EP32) and "manages 2 routed experts" (EP144), 288 slots.
    assert Layout(ep=32, num_slots=256 + 32).slots_per_gpu == 9
    assert Layout(ep=144, num_slots=256 + 32).slots_per_gpu == 2
    assert redundant_experts(256, 32, 32) == 32 and redundant_experts(256, 144) == 32


@pytest.mark.parametrize("fleet", ["h800", "h100-80g"])
def test_published_prefill_units_fit(fleet):
    # DeepSeek (H800) and SGLang (H100) prefill: EP32 over 4 nodes, 16,384 tokens per GPU.
    sizes = model_sizes(flavour("deepseek-v3"))
    memory = memory_per_gpu(
        sizes,
        load_fleet(fleet),
        Layout(ep=32, num_slots=288),
        FP8,
        sequences=0,
        kv_len=0,
        tokens=16384,
        logit_tokens=16384 / 4096,
    )
    assert memory.fits, f"{memory.total / 1e9:.1f} GB > {memory.capacity / 1e9:.1f} GB"


@pytest.mark.parametrize(
    "fleet, ep, batch, context, published",
    [
        ("h800", 144, 128, 4989, 14_800),  # DeepSeek Day-6: 18 nodes, ~14.8k output tokens/s per node
        ("h100-80g", 72, 256, 2000, 22_282),  # LMSYS 96 x H100: 9 decode nodes, 22,282 tokens/s per node
    ],
)
def test_published_decode_units_fit_and_estimate_within_stated_factor(fleet, ep, batch, context, published, capsys):
    sizes, spec = model_sizes(flavour("deepseek-v3")), load_fleet(fleet)
    layout = Layout(ep=ep, num_slots=288)
    memory = memory_per_gpu(sizes, spec, layout, FP8, sequences=batch, kv_len=context, tokens=batch)
    step = decode_step(sizes, spec, layout, FP8, batch=batch, context=context)
    per_node = step.tokens_per_s * spec.gpus_per_node
    with capsys.disabled():
        print(
            f"\n{fleet} EP{ep} decode: {memory.total / 1e9:.1f} of {memory.capacity / 1e9:.1f} GB, "
            f"estimate {per_node:,.0f} tokens/s/node vs published {published:,} ({per_node / published:.2f}x)"
        )
    assert memory.fits
    assert published <= per_node <= STATED_FACTOR * published


def test_prefill_attention_is_compute_bound_by_hand():
    # Mixtral prefill of one 4096-token prompt: a token attends to (4096 + 1) / 2 keys on average;
    # scores + values cost 4 x 32 heads x 128 dims per key per layer, over 32 layers, in BF16 at
    # 989.5 TFLOP/s x 0.67.
    sizes = model_sizes(flavour("mixtral-8x7b"))
    step = prefill_step(sizes, load_fleet("h100-80g"), Layout(ep=2, num_slots=8), BF16, tokens=4096, prompt_len=4096)
    assert step.attention_s == pytest.approx(4096 * 32 * 4 * 32 * 128 * 2048.5 / (989.5e12 * 0.67))


@pytest.mark.parametrize("model", ["deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
@pytest.mark.parametrize("fleet", FLEETS)
def test_plan_meets_its_targets_for_shipped_flavours_and_fleets(model, fleet):
    result = plan(PlanConfig(model=model, fleet=fleet, rps=20))
    assert result.memory.fits
    assert result.decode.seconds * 1e3 <= result.config.tpot_ms
    assert result.prefill.seconds * 1e3 <= result.config.ttft_ms
    assert result.replicas * result.requests_per_s_per_replica >= 20
    assert result.layout.num_slots % result.layout.ep == 0


def test_more_requests_need_more_replicas():
    small = plan(PlanConfig(model="deepseek-v3", fleet="h800", rps=5, ep=32))
    large = plan(PlanConfig(model="deepseek-v3", fleet="h800", rps=500, ep=32))
    assert large.replicas > small.replicas >= 1


def test_impossible_targets_say_why():
    with pytest.raises(ValueError, match="no layout meets the targets"):
        plan(PlanConfig(model="deepseek-v3", fleet="h800", tpot_ms=0.5))


def test_fleet_files_load_and_cite_sources(tmp_path):
    for name in FLEETS:
        spec = load_fleet(name)
        assert spec.name == name and spec.gpus_per_node == 8
    with pytest.raises(ValueError, match="not a shipped fleet"):
        load_fleet("tpu-v5")
    custom = tmp_path / "mine.yaml"
    custom.write_text(
        "name: mine\ngpu: x\nmemory_gb: 24\npeak_tflops: {bf16: 100, fp8: 200}\n"
        "hbm_tb_per_s: 1\ngpus_per_node: 4\nintra_node_gb_per_s: 32\ninter_node_gb_per_s: 12.5\n"
    )
    assert load_fleet(custom).memory_gb == 24
    custom.write_text("name: mine\n")
    with pytest.raises(ValueError, match="missing required key gpu"):
        load_fleet(custom)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="raymoe")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_cli_writes_json_for_manifests(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        _cli(
            [
                "plan",
                "--model",
                "deepseek-v3",
                "--fleet",
                "h800",
                "--rps",
                "10",
                "--tpot-ms",
                "60",
                "--json",
                str(out),
                "ep=32",
                "num_redundant_experts=32",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| deepseek-v3 | h800 | 32 x " in table
    data = json.loads(out.read_text())
    assert data["schema"] == PLAN_SCHEMA
    assert data["layout"]["ep"] == 32 and data["layout"]["num_slots"] == 288
    assert data["nodes_per_replica"] == 4 and data["targets"]["tpot_ms"] == 60
    assert data["replicas"] * data["gpus_per_replica"] == data["total_gpus"]


def test_plan_cli_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="unknown key bogus"):
        _cli(["plan", "--model", "deepseek-v3", "--fleet", "h800", "bogus=1"])


def test_planner_takes_a_cpu_fleet_file(tmp_path):
    # Prepare: a CPU written as a fleet file (one device per node, fp32 only).
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(
        "name: my-cpu\ngpu: a CPU\nmemory_gb: 24\npeak_tflops: {fp32: 0.3}\nhbm_tb_per_s: 0.024\n"
        "gpus_per_node: 1\nintra_node_gb_per_s: 1.25\ninter_node_gb_per_s: 1.25\n"
    )
    fp32 = {"weight_dtype": "fp32", "kv_dtype": "fp32", "attention_dtype": "fp32"}
    # Execute
    result = plan(
        PlanConfig(model="small", fleet=str(cpu), ep=1, input_len=64, output_len=64, roofline=RooflineConfig(**fp32))
    )
    # Assert: a one-device plan; a dtype the fleet lacks is named.
    assert result.layout.ep == 1 and result.replicas == 1 and result.memory.fits
    with pytest.raises(ValueError, match="fleet my-cpu has no peak for dtype 'bf16'"):
        plan(PlanConfig(model="small", fleet=str(cpu), ep=1))
