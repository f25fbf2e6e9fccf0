"""Memory per GPU and time per serving step of a MoE model, by roofline arithmetic.

A step (one decode token for B sequences per GPU, or a prefill chunk of T tokens per GPU) is three
kernel classes -- dense GEMMs (attention projections, shared experts, dense FFNs, output head),
the attention core, and the routed-expert GEMMs (reading the weights of the experts that receive
a token: `touched_fraction`) -- each taking
max(FLOPs / achievable FLOP/s, bytes read / achievable HBM bandwidth), plus the all-to-all
(dispatch + combine; decode sends each expert copy straight to its GPU, prefill sends a token
once per node and fans it out over NVLink there, as DeepEP's two kernel families do), which runs
concurrently with compute when two micro-batches alternate
(DeepSeek's dual micro-batch overlap; SGLang's two-batch overlap). The result is an upper bound on
speed: launch gaps, synchronisation, imperfect overlap and load imbalance beyond
`expert_imbalance` all make real steps slower.

Layout: every GPU holds the dense weights (split `attention_tp` ways) and `num_slots / ep` routed
expert slots per MoE layer; attention is data-parallel across the attention-tp groups, as in
DeepSeek's units ("Routed Expert EP32, MLA/Shared Expert DP32") and SGLang's DP attention.

Sources for the defaults: achievable fractions of peak from DeepSeek's kernels on H800 SXM5 --
DeepGEMM up to 1550 of 1979 FP8 TFLOPS (github.com/deepseek-ai/DeepGEMM), FlashMLA 660 of 989.5
BF16 TFLOPS and 3000 of 3350 GB/s (github.com/deepseek-ai/FlashMLA), DeepEP 153 of 160 GB/s on
NVLink (github.com/deepseek-ai/DeepEP, docs/legacy.md); FP8 dispatch and BF16 combine as in the
Day-6 overview; `memory_utilization` 0.9 as vLLM's default `gpu_memory_utilization`.

Legend: B sequences per GPU, T tokens per GPU in a step, K top-k, D model dim, F expert hidden,
H attention heads, c context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raymoe.config import require
from raymoe.deploy.fleet import FleetSpec
from raymoe.models.config import ModelConfig
from raymoe.models.param_count import parameter_counts

Dtype = Literal["fp8", "bf16", "fp32"]
BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


@dataclass(kw_only=True)
class RooflineConfig:
    """Precisions and the achievable fractions of peak the estimate assumes."""

    # "native" = as the checkpoint is published (the planner resolves it per flavour).
    weight_dtype: Literal["native", "fp8", "bf16", "fp32"] = "native"
    kv_dtype: Dtype = "bf16"
    # The attention core's operands (FlashMLA / FlashAttention run BF16; a CPU serving fp32 runs fp32).
    attention_dtype: Literal["bf16", "fp32"] = "bf16"
    # DeepSeek dispatches tokens in FP8 (plus one fp32 scale per 128 values) and combines in BF16.
    dispatch_dtype: Dtype = "fp8"
    combine_dtype: Dtype = "bf16"
    gemm_efficiency: float = 0.78
    attention_efficiency: float = 0.67
    hbm_efficiency: float = 0.9
    link_efficiency: float = 0.9
    # Two micro-batches alternate so the all-to-all hides behind compute (step = max, not sum).
    overlap_comm: bool = True
    # Fraction of HBM the weights, KV cache and activations may fill (the rest: CUDA context,
    # communication buffers, CUDA graphs, fragmentation).
    memory_utilization: float = 0.9
    # max / mean routed tokens per GPU after re-placement (1.0 = perfect EPLB).
    expert_imbalance: float = 1.0

    def weight_bytes(self) -> int:
        require(self.weight_dtype != "native", "roofline.weight_dtype=native must be resolved to fp8 or bf16 first")
        return BYTES[self.weight_dtype]

    def __post_init__(self) -> None:
        for key in (
            "gemm_efficiency",
            "attention_efficiency",
            "hbm_efficiency",
            "link_efficiency",
            "memory_utilization",
        ):
            value = getattr(self, key)
            require(0 < value <= 1, f"roofline.{key} must be in (0, 1], got {value}")
        require(self.expert_imbalance >= 1.0, f"roofline.expert_imbalance must be >= 1, got {self.expert_imbalance}")


@dataclass(kw_only=True)
class Layout:
    """Where the weights go: `ep` GPUs share the routed experts; dense weights split `attention_tp` ways."""

    ep: int
    num_slots: int  # physical expert slots per MoE layer (experts + redundant copies)
    attention_tp: int = 1

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.ep


@dataclass(frozen=True)
class ModelSizes:
    """What the arithmetic needs from a `ModelConfig` (parameter counts via `models.param_count`)."""

    cfg: ModelConfig
    total_params: int
    active_params: int
    expert_params: int  # one routed expert of one layer
    num_moe_layers: int
    embed_params: int  # input embedding + output head

    @property
    def routed_params(self) -> int:
        return self.num_moe_layers * self.cfg.moe.num_experts * self.expert_params

    @property
    def dense_params(self) -> int:
        """Everything every GPU holds: all but the routed experts (embeddings included)."""
        return self.total_params - self.routed_params

    @property
    def head_params(self) -> int:
        return self.cfg.vocab_size * self.cfg.dim

    @property
    def dense_matmul_params(self) -> int:
        """Dense weights a token multiplies with (the input embedding is a lookup, not a GEMM)."""
        routed_active = self.num_moe_layers * self.cfg.moe.num_experts_per_tok * self.expert_params
        return self.active_params - routed_active - self.cfg.vocab_size * self.cfg.dim

    def kv_bytes_per_token(self, dtype: Dtype) -> int:
        """KV cache per token over all layers: MLA keeps the latent + rope key, GQA keys + values."""
        c = self.cfg
        per_layer = c.kv_lora_rank + c.qk_rope_head_dim if c.attention == "mla" else 2 * c.num_kv_heads * c.head_dim
        return per_layer * c.num_layers * BYTES[dtype]

    def kv_copies(self, attention_tp: int) -> float:
        """How many GPUs of a tp group keep each cached token's KV: MLA's latent is not split by
        head (all tp ranks keep it); GQA splits the KV heads and replicates them past num_kv_heads."""
        if self.cfg.attention == "mla":
            return attention_tp
        return max(1.0, attention_tp / self.cfg.num_kv_heads)

    def attention_flops(self, context: float, decode: bool) -> float:
        """Attention-core FLOPs per token per layer at `context` keys (scores + weighted values).

        MLA decodes in the absorbed form (scores over the 512-d latent + rope key, values in the
        latent); MLA prefill expands keys and values per head, as DeepSeek's inference code does.
        """
        c = self.cfg
        if c.attention == "mla":
            if decode:
                return 2 * c.num_heads * context * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
            return 2 * c.num_heads * context * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
        return 4 * c.num_heads * c.head_dim * context


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    total, active = parameter_counts(cfg)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    embed = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return ModelSizes(
        cfg=cfg,
        total_params=total,
        active_params=active,
        expert_params=3 * cfg.dim * cfg.moe.expert_hidden_dim,
        num_moe_layers=moe_layers,
        embed_params=embed,
    )


def all_to_all_bytes(sizes: ModelSizes, rc: RooflineConfig) -> tuple[float, float]:
    """(dispatch, combine) bytes one token sends per MoE layer: K rows of D values each way."""
    d, k = sizes.cfg.dim, sizes.cfg.moe.num_experts_per_tok
    dispatch = k * d * BYTES[rc.dispatch_dtype] + (k * d / 128 * 4 if rc.dispatch_dtype == "fp8" else 0)
    return dispatch, k * d * BYTES[rc.combine_dtype]


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: float
    kv_cache: float
    activations: float
    capacity: float  # memory_gb x memory_utilization

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def memory_per_gpu(
    sizes: ModelSizes,
    fleet: FleetSpec,
    layout: Layout,
    rc: RooflineConfig,
    *,
    sequences: float,
    kv_len: float,
    tokens: float,
    logit_tokens: float | None = None,
) -> Memory:
    """Memory per GPU holding KV for `sequences` sequences of `kv_len` tokens, with `tokens` tokens
    in flight in one step, `logit_tokens` of them (default: all) producing fp32 logits."""
    c, w = sizes.cfg, rc.weight_bytes()
    dense = (sizes.dense_params - sizes.embed_params) * w + sizes.embed_params * _embed_bytes(w)
    experts = layout.slots_per_gpu * sizes.num_moe_layers * sizes.expert_params * w
    kv_per_seq = kv_len * sizes.kv_bytes_per_token(rc.kv_dtype) * sizes.kv_copies(layout.attention_tp)
    dispatch, combine = all_to_all_bytes(sizes, rc)
    k, f = c.moe.num_experts_per_tok, c.moe.expert_hidden_dim
    attention_width = (
        c.num_heads * (2 * (c.qk_nope_head_dim + c.qk_rope_head_dim) + c.v_head_dim)
        if c.attention == "mla"
        else (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    )
    per_token = 2 * (4 * c.dim + attention_width + k * 2 * f) + dispatch + combine
    logits = (tokens if logit_tokens is None else logit_tokens) * 4 * c.vocab_size
    return Memory(
        weights=dense / layout.attention_tp + experts,
        kv_cache=sequences * kv_per_seq,
        activations=tokens * per_token + logits,
        capacity=fleet.memory_gb * 1e9 * rc.memory_utilization,
    )


@dataclass(frozen=True)
class Step:
    """Seconds of one step per GPU, by part; `tokens` = tokens per GPU the step produces or reads."""

    tokens: float
    dense_s: float
    attention_s: float
    experts_s: float
    comm_s: float
    overlap: bool

    @property
    def seconds(self) -> float:
        compute = self.dense_s + self.attention_s + self.experts_s
        return max(compute, self.comm_s) if self.overlap else compute + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _rows_moved(
    sizes: ModelSizes,
    fleet: FleetSpec,
    layout: Layout,
    node_dedup: bool,
) -> tuple[float, float]:
    """(rows over the inter-node link, rows over NVLink) one token sends per MoE layer.

    Without dedup (DeepEP's low-latency decode kernels) each of the K expert copies is sent
    to its GPU. With dedup (DeepEP's normal kernels, used for prefill) a token crosses to each
    target node once and fans out over NVLink there; with group-limited routing and groups
    packed onto nodes (hierarchical EPLB) it reaches at most `topk_groups` nodes.
    """
    k = sizes.cfg.moe.num_experts_per_tok
    on_node = min(layout.ep, fleet.gpus_per_node)
    if not node_dedup:
        return k * (layout.ep - on_node) / layout.ep, k * (on_node - 1) / layout.ep
    nodes = -(-layout.ep // fleet.gpus_per_node)
    reached = nodes * (1 - (1 - 1 / nodes) ** k)  # expected distinct nodes among K uniform picks
    if sizes.cfg.moe.num_groups > 1:
        reached = min(reached, sizes.cfg.moe.topk_groups)
    return reached * (nodes - 1) / nodes, k * (1 - 1 / on_node)


def _embed_bytes(weight_bytes: int) -> int:
    """FP8 checkpoints (DeepSeek-V3) keep the embedding and output head in BF16; wider weights
    keep them as wide."""
    return max(weight_bytes, BYTES["bf16"])


def touched_fraction(sizes: ModelSizes, layout: Layout, tokens: float) -> float:
    """Expected share of a GPU's expert slots that receive a token in a step of `tokens` tokens
    per GPU: every GPU's tokens reach the experts (attention is data-parallel), each picks K of E
    experts, uniformly under balanced routing, so a slot stays idle with probability
    (1 - K/E) ** (tokens x ep). An idle expert's weights are not read. ~1 for the batches large
    serving runs; small at a one-sequence decode (top-2 of 8: a quarter of the experts)."""
    k, e = sizes.cfg.moe.num_experts_per_tok, sizes.cfg.moe.num_experts
    return 1.0 - (1.0 - k / e) ** (tokens * layout.ep)


def _roof(flops: float, bytes_: float, flops_per_s: float, bytes_per_s: float) -> float:
    return max(flops / flops_per_s, bytes_ / bytes_per_s)


def _step(sizes, fleet, layout, rc, *, tokens, logit_tokens, attention_flops, kv_read, node_dedup) -> Step:
    c, w = sizes.cfg, rc.weight_bytes()
    tp = layout.attention_tp
    hbm = fleet.hbm_tb_per_s * 1e12 * rc.hbm_efficiency
    gemm = fleet.peak_flops(rc.weight_dtype) * rc.gemm_efficiency
    head = sizes.head_params
    dense_flops = 2 * tokens * (sizes.dense_matmul_params - head) + 2 * logit_tokens * head
    dense_bytes = (sizes.dense_params - sizes.embed_params) * w / tp + head * _embed_bytes(w) / tp
    dense_s = _roof(dense_flops, dense_bytes, gemm, hbm)
    attention_s = _roof(attention_flops, kv_read, fleet.peak_flops(rc.attention_dtype) * rc.attention_efficiency, hbm)
    k = c.moe.num_experts_per_tok
    expert_flops = 2 * tokens * k * sizes.expert_params * sizes.num_moe_layers * rc.expert_imbalance
    expert_bytes = (
        layout.slots_per_gpu * touched_fraction(sizes, layout, tokens) * sizes.expert_params * sizes.num_moe_layers * w
    )
    experts_s = _roof(expert_flops, expert_bytes, gemm, hbm)
    comm_s = 0.0
    if layout.ep > 1:
        remote_rows, nearby_rows = _rows_moved(sizes, fleet, layout, node_dedup)
        dispatch, combine = all_to_all_bytes(sizes, rc)
        row_bytes = tokens * sizes.num_moe_layers * (dispatch + combine) / k
        comm_s = max(
            row_bytes * remote_rows / (fleet.inter_node_gb_per_s * 1e9 * rc.link_efficiency),
            row_bytes * nearby_rows / (fleet.intra_node_gb_per_s * 1e9 * rc.link_efficiency),
        )
    if tp > 1:  # all-reduce of each attention output inside the tp group (NVLink)
        comm_s += (
            2
            * (tp - 1)
            / tp
            * tokens
            * c.num_layers
            * c.dim
            * 2
            / (fleet.intra_node_gb_per_s * 1e9 * rc.link_efficiency)
        )
    return Step(
        tokens=tokens,
        dense_s=dense_s,
        attention_s=attention_s,
        experts_s=experts_s,
        comm_s=comm_s,
        overlap=rc.overlap_comm,
    )


def decode_step(
    sizes: ModelSizes, fleet: FleetSpec, layout: Layout, rc: RooflineConfig, *, batch: float, context: float
) -> Step:
    """One decode step with `batch` sequences per GPU, each attending to `context` cached tokens."""
    c = sizes.cfg
    kv_read = batch * context * sizes.kv_bytes_per_token(rc.kv_dtype) * sizes.kv_copies(layout.attention_tp)
    return _step(
        sizes,
        fleet,
        layout,
        rc,
        tokens=batch,
        logit_tokens=batch,
        attention_flops=batch * c.num_layers * sizes.attention_flops(context, decode=True),
        kv_read=kv_read,
        node_dedup=False,
    )


def prefill_step(
    sizes: ModelSizes, fleet: FleetSpec, layout: Layout, rc: RooflineConfig, *, tokens: float, prompt_len: float
) -> Step:
    """One prefill step of `tokens` prompt tokens per GPU from prompts of `prompt_len` tokens
    (causal: a token attends to (prompt_len + 1) / 2 keys on average)."""
    c = sizes.cfg
    attention = tokens * c.num_layers * sizes.attention_flops((prompt_len + 1) / 2, decode=False)
    return _step(
        sizes,
        fleet,
        layout,
        rc,
        tokens=tokens,
        logit_tokens=tokens / prompt_len,
        attention_flops=attention,
        kv_read=0.0,
        node_dedup=True,
    )
