"""The federated server (the job driver): rounds of configure -> local fit on silos -> aggregate.

Each round: the strategy samples silos (Flower's configure_fit), every selected silo actor trains
the global adapter on its own data (`raymoe.federated.silo`), the server keeps the results that
arrive before the deadline, rejects bad ones by reason (NaN/Inf, shapes, norm bound), aggregates
(the strategy's aggregate_fit; the DP-FedAvg noisy mean under privacy; the unmasked sum under
secure aggregation), evaluates on its own held-out file, and saves the round state atomically.
A round with fewer accepted updates than the quorum is retried (a secure round whose participant
dropped out after masking is aborted and retried with the survivors and fresh keys); after
`faults.max_round_retries` the job stops with the state of the last finished round kept, so a
rerun continues from there.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raymoe.federated.config import FederatedConfig
from raymoe.federated.privacy import PrivacyAccountant, clip_to_norm, noisy_mean
from raymoe.federated.round_state import RoundState, load_latest_round_state, save_round_state
from raymoe.federated.secure_aggregation import SecureAggregationAborted, SecureAggregationRound
from raymoe.federated.silo import PrivacyInstructions, SiloResult, secret_generator
from raymoe.federated.strategies import NotEnoughSilos, weighted_mean_from_sums
from raymoe.federated.updates import Params, filter_updates, flatten, unflatten, update_norm

log = logging.getLogger(__name__)
FAILED, LATE = "failed", "late"


class FederatedJobFailed(RuntimeError):
    """A round missed its quorum on every retry; the last finished round's state is kept."""


@dataclass
class RoundOutcome:
    """One attempt at a round."""

    params: Params | None  # the new global adapter; None when the attempt failed
    participants: list[str] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> silos
    dropped: list[str] = field(default_factory=list)  # failed or late silos
    silo_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def check_result_is_adapter_only(result: SiloResult, adapter_keys: set[str], mode: str = "plain") -> None:
    """Data stays home: a silo result may carry adapter tensors, counts and scalars, nothing else,
    in the form the round's mode expects ("plain": params; "dp": {"delta"}; "secure": masked)."""
    if not isinstance(result, SiloResult):
        raise TypeError(f"silo returned {type(result).__name__}, expected SiloResult")
    if mode == "secure":
        if result.params is not None or not isinstance(result.masked, np.ndarray) or result.masked.dtype != np.uint64:
            raise TypeError(f"silo {result.silo} returned no uint64 masked vector")
    elif result.masked is not None or result.params is None:
        raise TypeError(f"silo {result.silo} returned a masked vector or no parameters")
    elif set(result.params) != ({"delta"} if mode == "dp" else adapter_keys):
        raise ValueError(f"silo {result.silo} returned tensors that are not the adapter's")
    for value in (result.params or {}).values():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"silo {result.silo} returned a non-float tensor in its update")
    if result.tokens_per_expert_LE.dtype != torch.int64 or result.tokens_per_expert_LE.dim() != 2:
        raise TypeError(f"silo {result.silo} returned malformed expert counts")
    if not all(isinstance(v, float) for v in result.metrics.values()):
        raise TypeError(f"silo {result.silo} returned non-scalar metrics")


class FederatedServer:
    """Runs rounds against silo actors. `silos` maps silo name -> Ray actor handle."""

    def __init__(
        self,
        cfg: FederatedConfig,
        silos: dict[str, Any],
        initial: Params,
        counts_shape: tuple[int, int],
        evaluate: Callable[[Params], float] | None = None,
        on_round_start: Callable[[int, list[str]], None] | None = None,
    ):
        self.cfg = cfg
        self.silos = dict(silos)
        self.strategy = cfg.build_strategy()
        self.accountant = PrivacyAccountant()
        self.evaluate = evaluate
        self.on_round_start = on_round_start
        self.state = RoundState(round=0, params=initial)
        if cfg.resume and (saved := load_latest_round_state(cfg.output_dir)) is not None:
            if {k: tuple(v.shape) for k, v in saved.params.items()} != {k: tuple(v.shape) for k, v in initial.items()}:
                raise FederatedJobFailed(
                    f"output_dir={cfg.output_dir!r} holds rounds of another adapter (base or lora.* "
                    "changed since they were written): use a new output_dir, or resume=false"
                )
            self.state = saved
            if saved.strategy_state and hasattr(self.strategy, "load_state_dict"):
                self.strategy.load_state_dict(saved.strategy_state)
            if saved.accountant_state:
                self.accountant.load_state_dict(saved.accountant_state)
            print(f"resumed after round {saved.round} from {cfg.output_dir}", flush=True)
        self.adapter_keys = set(initial)
        # (model layers, experts): the shape of every silo's tokens-per-expert table.
        self.counts_shape = counts_shape

    # --- one attempt --------------------------------------------------------------------------
    def _gather(self, refs: dict[str, Any], expect: type = SiloResult) -> tuple[dict[str, Any], list[str]]:
        """Results that arrive before the deadline; the others (failed or late) as dropped."""
        import ray

        ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.faults.round_deadline_s)
        by_ref = {ref: silo for silo, ref in refs.items()}
        results, dropped = {}, []
        for ref in late:
            ray.cancel(ref)  # actor tasks cannot be force-cancelled; a queued one is dropped
            dropped.append(by_ref[ref])
            self._count_rejected(LATE)
        for ref in ready:
            silo = by_ref[ref]
            try:
                result = ray.get(ref)
                if not isinstance(result, expect):
                    raise TypeError(f"returned {type(result).__name__}, expected {expect.__name__}")
                if isinstance(result, SiloResult):
                    check_result_is_adapter_only(result, self.adapter_keys, self._mode())
                results[silo] = result
            except Exception as exc:  # noqa: BLE001 - a silo's failure is a dropout, not the job's
                log.warning("silo %s failed this round: %s", silo, str(exc).splitlines()[0])
                dropped.append(silo)
                self._count_rejected(FAILED)
                if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
                    self.silos.pop(silo, None)  # gone (e.g. its node was removed): never sampled again
        return results, dropped

    def _attempt(self, round: int, rng: np.random.Generator, exclude: set[str]) -> RoundOutcome:
        cfg, params = self.cfg, self.state.params
        available = sorted(s for s in self.silos if s not in exclude)
        selected = self.strategy.configure_fit(round, params, available, rng)
        names = [s for s, _ in selected]
        privacy = None
        if cfg.privacy.dp:
            privacy = PrivacyInstructions(
                clip_norm=cfg.privacy.clip_norm,
                noise_multiplier=cfg.privacy.noise_multiplier,
                mode="distributed" if cfg.privacy.secure_aggregation else "central",
                num_participants=len(names),
            )
        secure = None
        if cfg.privacy.secure_aggregation:
            secure = SecureAggregationRound(round, names)
            keys, dropped = self._gather({s: self.silos[s].public_key.remote(round) for s in names}, expect=bytes)
            if dropped:  # no masks exist yet: the attempt simply restarts without them
                return RoundOutcome(params=None, dropped=dropped)
            for silo, key in keys.items():
                secure.register_public_key(silo, key)
        if self.on_round_start is not None:
            self.on_round_start(round, names)
        refs = {
            silo: self.silos[silo].fit.remote(
                instructions, privacy, secure.peer_keys(silo) if secure else None, cfg.strategy.moe_aware
            )
            for silo, instructions in selected
        }
        results, dropped = self._gather(refs)
        outcome = RoundOutcome(params=None, dropped=dropped, silo_metrics={s: r.metrics for s, r in results.items()})
        if secure is not None:
            return self._aggregate_secure(round, secure, results, outcome, privacy)
        if privacy is not None:
            return self._aggregate_dp(round, results, outcome, privacy)
        return self._aggregate_plain(round, results, outcome)

    def _aggregate_plain(self, round: int, results: dict[str, SiloResult], outcome: RoundOutcome) -> RoundOutcome:
        updates = [r.as_update() for r in results.values()]
        bound = self.cfg.faults.max_update_norm or None
        accepted, rejected = filter_updates(updates, self.state.params, bound, self.counts_shape)
        for reason, silos in rejected.items():
            outcome.rejected[reason] += len(silos)
            self._count_rejected(reason, len(silos))
        outcome.participants = [u.silo for u in accepted]
        for u in accepted:
            self._observe_norm(update_norm(u.params, self.state.params))
        if len(accepted) >= self.cfg.faults.quorum:
            outcome.params = self.strategy.aggregate_fit(round, self.state.params, accepted)
        return outcome

    def _aggregate_dp(
        self, round: int, results: dict[str, SiloResult], outcome: RoundOutcome, privacy: PrivacyInstructions
    ) -> RoundOutcome:
        size = flatten(self.state.params).numel()
        deltas = {s: r.params["delta"] for s, r in results.items() if r.params is not None}
        good = {s: d for s, d in deltas.items() if d.numel() == size and torch.isfinite(d).all()}
        for _ in range(len(results) - len(good)):
            self._count_rejected("non_finite")
        outcome.participants = sorted(good)
        if len(good) < self.cfg.faults.quorum:
            return outcome
        # Clipped again here: the noise is calibrated to clip_norm, whatever a silo did.
        total = torch.stack([clip_to_norm(d, privacy.clip_norm)[0] for d in good.values()]).sum(0)
        # DP-FedAvg: the divisor is the number selected (public), not the number that answered.
        mean = noisy_mean(
            total,
            mode=privacy.mode,
            noise_multiplier=privacy.noise_multiplier,
            clip_norm=privacy.clip_norm,
            num_participants=privacy.num_participants,
            generator=secret_generator(),
        )
        outcome.params = self._from_mean(round, flatten(self.state.params).double() + mean.double())
        self._account(privacy.num_participants)
        return outcome

    def _aggregate_secure(
        self,
        round: int,
        secure: SecureAggregationRound,
        results: dict[str, SiloResult],
        outcome: RoundOutcome,
        privacy: PrivacyInstructions | None,
    ) -> RoundOutcome:
        for silo, result in results.items():
            if result.masked is not None:  # always, in this mode: checked as each result arrived
                secure.submit(silo, result.masked)
        try:
            total = torch.from_numpy(secure.aggregate())
        except SecureAggregationAborted as exc:
            # A participant dropped out after masking: its pairwise masks cannot be removed.
            log.warning("round %d aborted: %s did not return a masked update", round, exc.missing)
            return outcome
        except ValueError as exc:  # a malformed masked vector: the sum cannot be trusted
            log.warning("round %d aborted: %s", round, exc)
            self._count_rejected("wrong_shape")
            return outcome
        size = flatten(self.state.params).numel()
        expected = size if privacy is not None else size + len(self.state.params)
        if total.numel() != expected or len(results) < self.cfg.faults.quorum:
            log.warning(
                "round %d aborted: the masked sum has %d values (expected %d) from %d silos",
                round,
                total.numel(),
                expected,
                len(results),
            )
            return outcome
        outcome.participants = sorted(results)
        if privacy is not None:
            mean = total / privacy.num_participants  # the silos added the noise (distributed mode)
            outcome.params = self._from_mean(round, flatten(self.state.params).double() + mean)
            self._account(privacy.num_participants)
            return outcome
        numerators = unflatten(total[:size], self.state.params)
        weights = dict(zip(sorted(self.state.params), total[size:]))
        mean_params = weighted_mean_from_sums(
            {k: v.double() for k, v in numerators.items()}, weights, self.state.params
        )
        outcome.params = self._from_mean(round, flatten(mean_params).double())
        return outcome

    def _from_mean(self, round: int, mean_flat: torch.Tensor) -> Params:
        """The strategy's step from an already-averaged adapter (FedAvg: the mean itself; FedAdam
        and FedYogi: their server-optimiser step towards it)."""
        return self.strategy.step_from_mean(round, self.state.params, unflatten(mean_flat.float(), self.state.params))

    def _account(self, num_participants: int) -> None:
        # Sample rate 1: which silos take part is drawn from the config's seed, so it is public and
        # gives no privacy amplification (claiming q = k / N would under-report epsilon).
        if self.cfg.privacy.noise_multiplier > 0:
            self.accountant.step(self.cfg.privacy.noise_multiplier, 1.0)

    def _mode(self) -> str:
        privacy = self.cfg.privacy
        return "secure" if privacy.secure_aggregation else "dp" if privacy.dp else "plain"

    # --- metrics ------------------------------------------------------------------------------
    def _count_rejected(self, reason: str, n: int = 1) -> None:
        from raymoe.monitor import metrics as m

        m.ray_metric(m.FEDERATED_REJECTED_UPDATES).inc(n, tags={"run": self.cfg.name, "reason": reason})

    def _observe_norm(self, norm: float) -> None:
        from raymoe.monitor import metrics as m

        m.ray_metric(m.FEDERATED_UPDATE_NORM).observe(norm, tags={"run": self.cfg.name})

    # --- rounds -------------------------------------------------------------------------------
    def run(self) -> RoundState:
        """Runs the remaining rounds; returns the final state."""
        from raymoe.monitor import metrics as m

        cfg, run = self.cfg, {"run": self.cfg.name}
        for round in range(self.state.round + 1, cfg.rounds + 1):
            started = time.perf_counter()
            exclude: set[str] = set()
            for attempt in range(cfg.faults.max_round_retries + 1):
                rng = np.random.default_rng([cfg.seed, round, attempt])
                try:
                    outcome = self._attempt(round, rng, exclude)
                except NotEnoughSilos as exc:
                    outcome = RoundOutcome(params=None)
                    print(f"round {round} attempt {attempt + 1}: {exc}", flush=True)
                if outcome.params is not None and not all(torch.isfinite(t).all() for t in outcome.params.values()):
                    print(f"round {round} attempt {attempt + 1}: the aggregate is not finite; discarded", flush=True)
                    outcome.params = None
                if outcome.params is not None:
                    break
                # Retry without the silos that failed or were late (a secure round needs every
                # participant), as long as enough others remain to make a quorum.
                remaining = set(self.silos) - exclude - set(outcome.dropped)
                if len(remaining) >= max(cfg.faults.quorum, self.strategy.min_available_clients):
                    exclude |= set(outcome.dropped)
                print(
                    f"round {round} attempt {attempt + 1}: {len(outcome.participants)} accepted "
                    f"(quorum {cfg.faults.quorum}); dropped {outcome.dropped}, rejected "
                    f"{dict(outcome.rejected)}",
                    flush=True,
                )
            else:
                raise FederatedJobFailed(
                    f"round {round} missed its quorum of {cfg.faults.quorum} accepted updates in "
                    f"{cfg.faults.max_round_retries + 1} attempts; the state after round {round - 1} is "
                    f"kept in {cfg.output_dir} (rerun to resume)"
                )
            record: dict[str, Any] = {
                "round": round,
                "participants": outcome.participants,
                "dropped": outcome.dropped,
                "rejected": dict(outcome.rejected),
                "silo_loss": {s: v.get("loss") for s, v in outcome.silo_metrics.items()},
                "train_seconds": {s: v.get("train_seconds") for s, v in outcome.silo_metrics.items()},
            }
            # Wall time of the round up to the new global adapter (evaluation not included).
            record["round_seconds"] = time.perf_counter() - started
            if self.evaluate is not None:
                record["eval_loss"] = self.evaluate(outcome.params)
            if cfg.privacy.noise_multiplier > 0:
                record["epsilon"] = self.accountant.epsilon(cfg.privacy.delta)
            strategy_state = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else {}
            self.state = RoundState(
                round=round,
                params=outcome.params,
                strategy_state=strategy_state,
                accountant_state=self.accountant.state_dict(),
                history=[*self.state.history, record],
            )
            save_round_state(cfg.output_dir, self.state)
            m.ray_metric(m.FEDERATED_ROUND).set(round, tags=run)
            m.ray_metric(m.FEDERATED_PARTICIPANTS).set(len(outcome.participants), tags=run)
            if "eval_loss" in record:
                m.ray_metric(m.FEDERATED_EVAL_LOSS).set(record["eval_loss"], tags=run)
            if "epsilon" in record:
                m.ray_metric(m.FEDERATED_EPSILON).set(record["epsilon"], tags=run)
            print(_round_line(record, cfg.rounds), flush=True)
        return self.state


def _round_line(record: dict[str, Any], rounds: int) -> str:
    parts = [f"round {record['round']}/{rounds}", f"participants {len(record['participants'])}"]
    if record["dropped"]:
        parts.append(f"dropped {record['dropped']}")
    if record["rejected"]:
        parts.append(f"rejected {record['rejected']}")
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f}")
    if "epsilon" in record:
        parts.append(f"epsilon {record['epsilon']:.2f}")
    return "  ".join(parts)


def output_paths(cfg: FederatedConfig) -> dict[str, str]:
    return {"adapter": os.path.join(cfg.output_dir, "adapter"), "metrics": os.path.join(cfg.output_dir, "metrics.json")}
