"""One training step of the debug model on CUDA under bf16 autocast stays close to the fp32 step.

Two copies of the same initialised model take one `train_step` on the same batch, one with
`bf16=True` (autocast: matmul inputs rounded to bf16, fp32 accumulation, fp32 master weights) and
one in fp32. Compared: the loss, every parameter's gradient (cosine similarity) and the fp32
weights after the AdamW update.

Routing is discrete: a token whose expert scores nearly tie can pick another expert once its
hidden state carries bf16 rounding, and then a whole token's gradient moves from one expert (and
the norms and router feeding it) to another. Measured with the CPU's bf16 autocast on this batch:
0.4-0.8% of tokens per layer switch with the router in fp32, which alone takes some gradient
cosines to 0.988. So the bf16 run replays the fp32 run's expert choices (`_Routing`), and what is
compared is the bf16 arithmetic. That the router itself stays fp32 under autocast, as
`Router.forward` documents, is checked on its own.

Skipped without CUDA. RAYMOE_GPU_TEST_ON_CPU=1 runs it with the CPU's bf16 autocast (what
`train.precision: auto` uses on CPUs with AMX or AVX512-BF16), to check the test logic.
"""

import torch

from raymoe.models import MoETransformer, flavour
from raymoe.parallel.groups import build_groups
from raymoe.parallel.layout import ParallelLayout
from raymoe.train.config import OptimConfig
from raymoe.train.step import build_optimizer, train_step
from tests.gpu.target_device import DEVICE_TYPE, requires_cuda

pytestmark = requires_cuda

LR = 1e-3

# Tolerances, against what the CPU's bf16 autocast measured on this batch (routing replayed).
# bf16 keeps 8 significant bits (a relative rounding of up to 2^-9 ~ 2e-3 per cast). The loss is
# computed in fp32 from the logits, so only the rounding upstream reaches it, averaged over 256
# tokens: measured 1e-5 relative; 2e-3 (one cast's rounding) leaves room for CUDA's kernels and
# is far below what a broken cast does (fp16 overflow, a bf16 loss: 1e-2 and up).
LOSS_REL_TOL = 2e-3
# Each gradient is a product of several bf16-rounded factors; it keeps its direction (cosine
# > 0.99 = an angle under 8 degrees) while the rounding is ~1% of its norm. Measured: >= 0.9998.
GRAD_MIN_COSINE = 0.99
# Adam's first step moves each weight by lr * m / (sqrt(v) + eps) ~ lr * sign(grad), so the two
# runs move each element by the same +-lr except where a gradient element is so near zero that
# rounding flips its sign (a difference of 2 * lr there). Bounded: no element differs by more
# than 2 * lr; at most FLIP_FRACTION of a tensor's elements differ by more than lr / 2 (measured:
# 1.6% on the worst tensor, a norm weight whose 128 gradients are sums of small terms).
FLIP_FRACTION = 0.05


class _Routing:
    """A forward hook for every router: records each call's expert choice, or replays them."""

    def __init__(self) -> None:
        self.choices: list[torch.Tensor] = []
        self.replaying = False
        self.switched = 0  # (token, k) choices the replay overrode
        self.replayed = 0  # router calls replayed so far

    def hook(self, router, inputs, output):
        weights_TK, expert_ids_TK, scores_TE, logits_TE = output
        if not self.replaying:
            self.choices.append(expert_ids_TK)
            return None
        pinned_TK = self.choices[self.replayed]
        self.replayed += 1
        self.switched += int((pinned_TK.sort(-1).values != expert_ids_TK.sort(-1).values).sum())
        # The combine weights at the pinned choice, as Router.forward derives them from its scores.
        weights_TK = scores_TE.gather(1, pinned_TK)
        if router.cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * router.cfg.routed_scaling_factor, pinned_TK, scores_TE, logits_TE


def _one_step(init_state: dict, ids_BT: torch.Tensor, bf16: bool, routing: _Routing):
    """(loss, gradients, weights after the step, parameter dtypes) of one step from `init_state`."""
    model = MoETransformer(flavour("debug")).to(DEVICE_TYPE)
    model.load_state_dict(init_state)
    for moe in model.moe_layers():
        moe.router.register_forward_hook(routing.hook)
    optimizer = build_optimizer(model, OptimConfig(lr=LR, warmup_steps=0, clip_norm=0.0))
    groups = build_groups(ParallelLayout())  # one process, no process group
    micro = [(ids_BT[:, :-1], ids_BT[:, 1:])]
    result = train_step(model, optimizer, micro, groups=groups, lr=LR, clip_norm=0.0, bf16=bf16)
    # clip_norm=0: the gradients stay as backward left them (optimizer.step does not clear them).
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: p.detach().cpu() for n, p in model.named_parameters()}
    return result.loss, grads, weights, {p.dtype for p in model.parameters()}


def test_bf16_step_is_close_to_the_fp32_step():
    # Prepare: one initialised model, one batch of 8 sequences of 32 tokens (+ the next token).
    init = MoETransformer(flavour("debug"))
    init.init_weights(seed=0)
    init_state = {k: v.to(DEVICE_TYPE) for k, v in init.state_dict().items()}
    ids_BT = torch.randint(0, 2048, (8, 33), generator=torch.Generator().manual_seed(0)).to(DEVICE_TYPE)
    routing = _Routing()

    # Execute: fp32 first (it records the routing), then bf16 replaying it.
    loss32, grads32, weights32, dtypes32 = _one_step(init_state, ids_BT, bf16=False, routing=routing)
    routing.replaying = True
    loss16, grads16, weights16, dtypes16 = _one_step(init_state, ids_BT, bf16=True, routing=routing)

    # Assert: autocast really ran (the losses differ), every router call was replayed, the
    # master weights stayed fp32, and the loss is within the bf16 tolerance.
    assert loss16 != loss32
    assert routing.replayed == len(routing.choices) > 0
    assert dtypes16 == dtypes32 == {torch.float32}
    assert abs(loss16 - loss32) <= LOSS_REL_TOL * abs(loss32), (loss16, loss32, routing.switched)
    # Gradients: the same parameters got one; each non-trivial one points the same way. Trivial =
    # a norm below 1e-6 of the largest (an expert no token chose gets None, not a zero).
    assert grads16.keys() == grads32.keys()
    largest = max(float(g.norm()) for g in grads32.values())
    checked = 0
    for name, g32 in grads32.items():
        if float(g32.norm()) < 1e-6 * largest:
            continue
        cosine = float(torch.nn.functional.cosine_similarity(grads16[name].flatten(), g32.flatten(), dim=0))
        assert cosine > GRAD_MIN_COSINE, (name, cosine)
        checked += 1
    assert checked >= len(grads32) // 2
    # Weights after the update: within Adam's bounds above.
    for name, w32 in weights32.items():
        diff = (weights16[name] - w32).abs()
        assert float(diff.max()) <= 2 * LR * (1 + 1e-3), name
        assert float((diff > LR / 2).float().mean()) <= FLIP_FRACTION, name


def test_router_scores_stay_fp32_under_bf16_autocast():
    # Prepare: one router of the debug model and some hidden states.
    model = MoETransformer(flavour("debug"))
    model.init_weights(seed=0)
    router = next(iter(model.moe_layers())).router.to(DEVICE_TYPE)
    x_TD = torch.randn(64, model.cfg.dim, generator=torch.Generator().manual_seed(0)).to(DEVICE_TYPE)

    # Execute: as inside a bf16 training step.
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
        weights_TK, _, scores_TE, logits_TE = router(x_TD)

    # Assert: Router.forward documents float32 scores and weights (it casts to float32 so that
    # near-tied experts are told apart at fp32 precision); autocast must not undo that.
    dtypes = (logits_TE.dtype, scores_TE.dtype, weights_TK.dtype)
    assert dtypes == (torch.float32,) * 3, f"router (logits, scores, weights) under bf16 autocast: {dtypes}"
