"""What the drift job starts when it finds drift: router-load drift re-places experts, input drift
or quality decay fine-tunes. Each action is off unless enabled, and every decision is logged to
`actions.jsonl` (also when an action is off, so the log says what would have run).

Locally an action runs as a subprocess of the job (it waits, the return code is logged); on a
cluster it is submitted through the Ray Jobs SDK to the dashboard address, like `ray job submit`,
and the submission id is logged.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raymoe.atomic_io import append_jsonl
from raymoe.monitor.drift_job_config import ActionConfig, ActionsConfig

log = logging.getLogger(__name__)


def run_action(name: str, action: ActionConfig, reason: str, log_path: Path) -> dict[str, Any]:
    """Runs (or, when disabled, only records) one action; returns the logged record."""
    record: dict[str, Any] = {
        "time": time.time(),
        "action": name,
        "reason": reason,
        "entrypoint": action.entrypoint,
        "mode": action.mode,
        "enabled": action.enabled,
    }
    if not action.enabled:
        log.info("drift: %s would run (actions.%s.enabled is false): %s", name, name, reason)
    elif action.mode == "subprocess":
        # `python` is this job's interpreter (its venv), as `ray job submit` runs the cluster's.
        command = [sys.executable if action.entrypoint[0] == "python" else action.entrypoint[0], *action.entrypoint[1:]]
        log.info("drift: running %s (%s): %s", name, reason, shlex.join(command))
        record["returncode"] = subprocess.run(command, check=False).returncode
    else:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(action.address)
        record["submission_id"] = client.submit_job(entrypoint=shlex.join(action.entrypoint))
        log.info("drift: submitted %s to %s as %s (%s)", name, action.address, record["submission_id"], reason)
    append_jsonl(log_path, record)
    return record


def act_on(
    actions: ActionsConfig,
    *,
    router_drift: bool,
    input_drift: bool,
    quality_decay: bool,
    drifted_features: list[str],
    log_path: Path,
) -> list[dict[str, Any]]:
    """The actions this check calls for: rebalance on router drift, fine-tune on input drift or
    quality decay (one fine-tune for both)."""
    records = []
    if router_drift:
        records.append(run_action("rebalance", actions.rebalance, "router-load drift (expert_load)", log_path))
    if input_drift or quality_decay:
        reasons = (
            [f"input drift ({', '.join(f for f in drifted_features if f != 'expert_load')})"] if input_drift else []
        ) + (["quality decay"] if quality_decay else [])
        records.append(run_action("finetune", actions.finetune, " and ".join(reasons), log_path))
    return records
