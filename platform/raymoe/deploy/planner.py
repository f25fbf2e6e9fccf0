"""Capacity planner: model flavour + fleet + targets -> layout, memory, speed and replicas.

For every candidate layout (expert-parallel degree `ep`, attention tensor-parallel degree `tp`)
the planner finds the largest decode batch per GPU that fits in memory and meets the TPOT target,
and the largest prefill chunk per GPU that fits and meets the TTFT target (`deploy.roofline`),
then the replicas (units of `ep` GPUs) that the request rate needs. It keeps the layout with the
fewest GPUs in all (ties: smaller ep, then smaller tp).

A unit serves prefill and decode on the same GPUs (as `raymoe serve` does): a request costs
input_len / prefill tokens/s + output_len / decode tokens/s of unit time. DeepSeek and SGLang
split the two phases over separate units (PD disaggregation); `deploy.roofline` prices either.

Defaults: input 2000 tokens (LMSYS's 96-H100 runs), output 550 (DeepSeek's day of 608B input vs
168B output tokens, Day-6 overview), TPOT 50 ms (DeepSeek's average 20-22 tokens/s per user),
TTFT 2 s, at most 256 sequences per GPU in a decode step (SGLang's decode batch; DeepEP's
low-latency buffers are sized per rank) and 16384 prefill tokens per GPU (DeepSeek's profile).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from raymoe.config import require
from raymoe.deploy.fleet import FleetSpec, load_fleet
from raymoe.deploy.roofline import (
    Dtype,
    Layout,
    Memory,
    ModelSizes,
    RooflineConfig,
    Step,
    all_to_all_bytes,
    decode_step,
    memory_per_gpu,
    model_sizes,
    prefill_step,
)
from raymoe.models.config import flavour

PLAN_SCHEMA = "raymoe.plan/v1"
# Weights as published: DeepSeek-V3 ships FP8 (128x128 block scales), the others BF16.
NATIVE_WEIGHT_DTYPE: dict[str, Dtype] = {"deepseek-v3": "fp8"}


@dataclass(kw_only=True)
class PlanConfig:
    """What `raymoe plan` is asked; 0 / -1 mean "let the planner choose"."""

    model: str  # a flavour name (raymoe.models.config.FLAVOURS)
    fleet: str  # a shipped fleet name (deploy.fleet.FLEETS) or a fleet YAML path
    rps: float = 0.0  # requests per second to serve; 0 = size one replica
    ttft_ms: float = 2000.0
    tpot_ms: float = 50.0
    input_len: int = 2000
    output_len: int = 550
    ep: int = 0
    attention_tp: int = 0
    # Redundant expert slots per layer; -1 = at least 1/8 of the experts (DeepSeek: 32 of 256),
    # rounded up so the slots split evenly over ep (none when ep = 1).
    num_redundant_experts: int = -1
    max_ep: int = 256
    max_batch_per_gpu: int = 256
    max_prefill_tokens_per_gpu: int = 16384
    roofline: RooflineConfig = field(default_factory=RooflineConfig)

    def __post_init__(self) -> None:
        for key in (
            "ttft_ms",
            "tpot_ms",
            "input_len",
            "output_len",
            "max_batch_per_gpu",
            "max_prefill_tokens_per_gpu",
            "max_ep",
        ):
            require(getattr(self, key) > 0, f"plan.{key} must be > 0, got {getattr(self, key)}")
        require(self.rps >= 0, f"plan.rps must be >= 0, got {self.rps}")
        require(self.ep >= 0 and self.attention_tp >= 0, "plan.ep and plan.attention_tp must be >= 0 (0 = choose)")


@dataclass(frozen=True)
class Plan:
    """One chosen layout with its memory, speed and size."""

    config: PlanConfig
    fleet: FleetSpec
    sizes: ModelSizes
    layout: Layout
    memory: Memory
    decode: Step
    prefill: Step
    replicas: int

    @property
    def nodes_per_replica(self) -> int:
        return -(-self.layout.ep // self.fleet.gpus_per_node)

    @property
    def requests_per_s_per_replica(self) -> float:
        """Requests/s one replica sustains when prefill and decode share its GPUs."""
        per_gpu = self.config.input_len / self.prefill.tokens_per_s + self.config.output_len / self.decode.tokens_per_s
        return self.layout.ep / per_gpu

    def to_dict(self) -> dict:
        """Plain data for JSON (`raymoe manifests render` reads this; schema PLAN_SCHEMA)."""
        gb = 1e9
        dispatch, combine = all_to_all_bytes(self.sizes, self.config.roofline)
        cfg = self.config
        return {
            "schema": PLAN_SCHEMA,
            "model": cfg.model,
            "fleet": self.fleet.name,
            "gpu": self.fleet.gpu,
            "params": {"total": self.sizes.total_params, "active": self.sizes.active_params},
            "layout": {
                "ep": self.layout.ep,
                "dp": 1,
                "attention_tp": self.layout.attention_tp,
                "num_slots": self.layout.num_slots,
                "num_redundant_experts": self.layout.num_slots - self.sizes.cfg.moe.num_experts,
            },
            "replicas": self.replicas,
            "gpus_per_replica": self.layout.ep,
            "gpus_per_node": self.fleet.gpus_per_node,
            "nodes_per_replica": self.nodes_per_replica,
            "total_gpus": self.replicas * self.layout.ep,
            "memory_per_gpu_gb": {
                "weights": self.memory.weights / gb,
                "kv_cache": self.memory.kv_cache / gb,
                "activations": self.memory.activations / gb,
                "total": self.memory.total / gb,
                "capacity": self.memory.capacity / gb,
            },
            "all_to_all_bytes_per_token_per_layer": {"dispatch": dispatch, "combine": combine},
            "decode": _step_dict(self.decode, "batch_per_gpu", self.fleet.gpus_per_node),
            "prefill": _step_dict(self.prefill, "tokens_per_gpu", self.fleet.gpus_per_node),
            "requests_per_s_per_replica": self.requests_per_s_per_replica,
            "targets": {
                "rps": cfg.rps,
                "ttft_ms": cfg.ttft_ms,
                "tpot_ms": cfg.tpot_ms,
                "input_len": cfg.input_len,
                "output_len": cfg.output_len,
            },
            "roofline": asdict(cfg.roofline),
        }


def _step_dict(step: Step, size_key: str, gpus_per_node: int) -> dict:
    return {
        size_key: step.tokens,
        "step_ms": step.seconds * 1e3,
        "tokens_per_s_per_gpu": step.tokens_per_s,
        "tokens_per_s_per_node": step.tokens_per_s * gpus_per_node,
        "parts_ms": {
            "dense": step.dense_s * 1e3,
            "attention": step.attention_s * 1e3,
            "experts": step.experts_s * 1e3,
            "all_to_all": step.comm_s * 1e3,
        },
    }


def redundant_experts(num_experts: int, ep: int, requested: int = -1) -> int:
    """Redundant slots for `ep` workers: `requested` if >= 0 (must make the slots split evenly),
    else the fewest >= num_experts / 8 that do (0 when ep = 1)."""
    if requested >= 0:
        require(
            (num_experts + requested) % ep == 0,
            f"num_redundant_experts={requested}: {num_experts} + {requested} slots do not split over ep={ep}",
        )
        return requested
    if ep == 1:
        return 0
    extra = -(-num_experts // 8)
    return extra + (-(num_experts + extra)) % ep


def _largest(lo: int, hi: int, ok) -> int:
    """Largest n in lo..hi with ok(n), assuming ok is true up to some n and false after; lo-1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def evaluate(cfg: PlanConfig, sizes: ModelSizes, fleet: FleetSpec, ep: int, tp: int) -> Plan | str:
    """The plan for one layout, or a sentence saying why it cannot meet the targets."""
    rc = cfg.roofline
    num_experts = sizes.cfg.moe.num_experts
    if cfg.num_redundant_experts >= 0 and (num_experts + cfg.num_redundant_experts) % ep:
        return (
            f"ep={ep} tp={tp}: {num_experts} experts + num_redundant_experts={cfg.num_redundant_experts} "
            f"do not split over {ep} GPUs"
        )
    layout = Layout(
        ep=ep, num_slots=num_experts + redundant_experts(num_experts, ep, cfg.num_redundant_experts), attention_tp=tp
    )
    kv_len = cfg.input_len + cfg.output_len
    context = cfg.input_len + cfg.output_len / 2

    def memory(batch: float, tokens: float) -> Memory:
        # A step holds either the decode batch or a prefill chunk (logits for its prompts' ends).
        logit_tokens = batch if tokens <= batch else tokens / cfg.input_len
        return memory_per_gpu(
            sizes, fleet, layout, rc, sequences=batch, kv_len=kv_len, tokens=tokens, logit_tokens=logit_tokens
        )

    min_chunk = -(-cfg.input_len // tp)  # a prompt's tokens are split over its tp group
    # Room for the decode batch's KV cache plus one prompt's prefill activations.
    fits = _largest(1, cfg.max_batch_per_gpu, lambda b: memory(b, max(b, min_chunk)).fits)
    if fits < 1:
        m = memory(1, min_chunk)
        return (
            f"ep={ep} tp={tp}: {m.total / 1e9:.1f} GB per GPU for weights, one sequence and one "
            f"prompt's activations exceeds {m.capacity / 1e9:.1f} GB"
        )

    def decode(b: float) -> Step:
        return decode_step(sizes, fleet, layout, rc, batch=b, context=context)

    batch = _largest(1, fits, lambda b: decode(b).seconds <= cfg.tpot_ms / 1e3)
    if batch < 1:
        return (
            f"ep={ep} tp={tp}: one sequence per GPU already takes {decode(1).seconds * 1e3:.1f} ms "
            f"per token > tpot_ms={cfg.tpot_ms}"
        )
    ttft = cfg.ttft_ms / 1e3

    def prefill_ok(t: int) -> bool:
        return (
            memory(batch, t).fits
            and prefill_step(sizes, fleet, layout, rc, tokens=t, prompt_len=cfg.input_len).seconds <= ttft
        )

    chunk = _largest(min_chunk, max(min_chunk, cfg.max_prefill_tokens_per_gpu), prefill_ok)
    if chunk < min_chunk:
        step = prefill_step(sizes, fleet, layout, rc, tokens=min_chunk, prompt_len=cfg.input_len)
        return f"ep={ep} tp={tp}: one prompt takes {step.seconds * 1e3:.0f} ms to prefill > ttft_ms={cfg.ttft_ms}"
    prefill = prefill_step(sizes, fleet, layout, rc, tokens=chunk, prompt_len=cfg.input_len)
    plan = Plan(
        config=cfg,
        fleet=fleet,
        sizes=sizes,
        layout=layout,
        memory=memory(batch, max(batch, chunk)),
        decode=decode(batch),
        prefill=prefill,
        replicas=1,
    )
    replicas = max(1, -(-cfg.rps // plan.requests_per_s_per_replica)) if cfg.rps else 1
    return dataclasses.replace(plan, replicas=int(replicas))


def candidate_layouts(cfg: PlanConfig, sizes: ModelSizes, fleet: FleetSpec) -> list[tuple[int, int]]:
    """(ep, tp) pairs to try: powers of two up to a node, then whole nodes, up to max_ep."""
    c, gpn = sizes.cfg, fleet.gpus_per_node
    eps = (
        [cfg.ep]
        if cfg.ep
        else sorted({e for e in (2**i for i in range(12)) if e <= gpn} | set(range(2 * gpn, cfg.max_ep + 1, gpn)))
    )
    eps = [e for e in eps if e <= cfg.max_ep or cfg.ep]
    tps = [cfg.attention_tp] if cfg.attention_tp else [t for t in (1, 2, 4, 8) if t <= gpn and c.num_heads % t == 0]
    return [(e, t) for e in eps for t in tps if e % t == 0]


def plan(cfg: PlanConfig) -> Plan:
    """The layout that meets the targets with the fewest GPUs.

    Raises:
        ValueError: no candidate layout meets them; the message gives each layout's reason.
    """
    try:
        sizes = model_sizes(flavour(cfg.model))
    except ValueError as exc:
        raise ValueError(f"plan.model: {exc}") from None
    fleet = load_fleet(cfg.fleet)
    if cfg.roofline.weight_dtype == "native":
        native = NATIVE_WEIGHT_DTYPE.get(cfg.model, "bf16")
        cfg = dataclasses.replace(cfg, roofline=dataclasses.replace(cfg.roofline, weight_dtype=native))
    found: list[Plan] = []
    reasons: list[str] = []
    for ep, tp in candidate_layouts(cfg, sizes, fleet):
        result = evaluate(cfg, sizes, fleet, ep, tp)
        if isinstance(result, str):
            reasons.append(result)
        else:
            found.append(result)
    if not found:
        raise ValueError(f"{cfg.model} on {fleet.name}: no layout meets the targets:\n  " + "\n  ".join(reasons[:12]))
    return min(found, key=lambda p: (p.replicas * p.layout.ep, p.layout.ep, p.layout.attention_tp))


def format_table(plans: list[Plan]) -> str:
    """Markdown table, one row per plan."""
    header = [
        "model",
        "fleet",
        "ep x tp",
        "slots",
        "weights GB",
        "KV GB",
        "act GB",
        "a2a KB/tok/layer",
        "decode batch",
        "decode tok/s/GPU",
        "TPOT ms",
        "prefill tok/s/GPU",
        "prefill step ms",
        "req/s/replica",
        "replicas",
        "GPUs",
    ]
    rows = []
    for p in plans:
        d = p.to_dict()
        a2a = d["all_to_all_bytes_per_token_per_layer"]
        mem = d["memory_per_gpu_gb"]
        rows.append(
            [
                p.config.model,
                p.fleet.name,
                f"{p.layout.ep} x {p.layout.attention_tp}",
                p.layout.num_slots,
                f"{mem['weights']:.1f}",
                f"{mem['kv_cache']:.1f}",
                f"{mem['activations']:.1f}",
                f"{(a2a['dispatch'] + a2a['combine']) / 1e3:.1f}",
                f"{p.decode.tokens:.0f}",
                f"{p.decode.tokens_per_s:,.0f}",
                f"{p.decode.seconds * 1e3:.1f}",
                f"{p.prefill.tokens_per_s:,.0f}",
                f"{p.prefill.seconds * 1e3:.0f}",
                f"{p.requests_per_s_per_replica:.1f}",
                p.replicas,
                p.replicas * p.layout.ep,
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
