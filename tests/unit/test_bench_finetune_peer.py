"""The fine-tuning benchmark's peft + transformers peer does raymoe's work: the same LoRA targets
and ranks, the same batches, tokens and loss, the same optimizer step.

Reference: transformers + peft themselves (the peer's loss on the base model at step 1, and after
one AdamW step from the same adapter); a hand-worked cross-entropy for the target alignment.
"""

import math

import pytest
import torch

from bench.bench_finetune import DATA, load_steps, make_artifact, peer_loss, peer_side, raymoe_side


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Mixtral artifact and the benchmark's first five batches on it (batch 4)."""
    artifact = str(
        make_artifact(
            tmp_path_factory.mktemp("ft") / "base", DATA, vocab_size=600, dim=64, num_layers=2, max_seq_len=128
        )
    )
    return artifact, load_steps(artifact, DATA, max_seq_len=128, batch=4, count=5)


def test_peer_loss_scores_position_t_against_the_already_shifted_target_t():
    # Prepare: position 0 is sure of token 2, position 1 is uniform over 4 tokens; only
    # position 1 carries a target (token 3), as `collate` leaves it (already shifted).
    logits_BTV = torch.tensor([[[0.0, 0.0, 50.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    targets_BT = torch.tensor([[-100, 3]])
    # Execute
    loss = peer_loss(logits_BTV, targets_BT, answers=1)
    # Assert: -log(1/4); shifting once more would score position 0 (loss ~50) or nothing.
    assert float(loss) == pytest.approx(math.log(4), rel=1e-6)


def test_batches_count_non_padding_inputs_and_answer_targets(tiny):
    _, steps = tiny
    for step in steps:
        input_ids_BT, targets_BT, real_BT = step["micro"]
        # Tokens are the real (non-padding) inputs; answers are the targets that carry loss.
        assert step["tokens"] == int(real_BT.sum()) < input_ids_BT.numel()
        assert step["answers"] == int((targets_BT != -100).sum()) > 0
        # No target outside the real inputs: padding carries no loss on either side.
        assert not (targets_BT != -100)[~real_BT].any()


def test_peer_has_the_same_lora_targets_and_shapes(tiny):
    artifact, _ = tiny
    trainer, _ = raymoe_side(artifact)
    ours = {k: tuple(v.shape) for k, v in trainer.local_tensors().items()}
    peer, _ = peer_side(artifact, trainer.local_tensors(), bf16=False)
    theirs = {n.replace(".default.", "."): tuple(p.shape) for n, p in peer.named_parameters() if p.requires_grad}
    assert theirs == ours
    # q/k/v/o of both layers, an A and a B each.
    assert len(ours) == 2 * 4 * 2


def test_peer_matches_our_loss_at_step_one_and_after_four_updates(tiny):
    # Prepare: both sides from the same base and the same initial adapter (B = 0).
    artifact, steps = tiny
    torch.manual_seed(0)
    trainer, ours = raymoe_side(artifact)
    _, theirs = peer_side(artifact, {k: v.clone() for k, v in trainer.local_tensors().items()}, bf16=False)
    # Execute: the same five batches on each side.
    our_losses = [ours(b) for b in steps]
    peer_losses = [theirs(b) for b in steps]
    # Assert: step 1 is the base model's loss; the next follow identical AdamW + clip updates.
    # Adam's first update is lr * sign(grad) whatever the betas or clipping; a different beta2 or
    # no clipping moves the loss by > 1e-4 relative by step 4 or 5 (the sides agree to ~1e-7).
    assert our_losses[0] == pytest.approx(peer_losses[0], rel=1e-5)
    assert our_losses[1:] == pytest.approx(peer_losses[1:], rel=1e-5)
    assert our_losses[1] != pytest.approx(our_losses[0], rel=1e-3)  # the update changed something
