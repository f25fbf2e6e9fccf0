"""The alert rules: generated file in step with the code, every metric in the registry, and each
rule checked by promtool (`check rules`, then `test rules` with one firing, one pending and one
quiet scenario per rule). Expected values are worked out by hand in the comments."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raymoe.monitor import alerts

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts" / "raymoe-alerts.rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: `make test` installs it (apt-get install prometheus)"
)

# Labels Ray and the scrape add to every series; the rules must aggregate them away.
RAY = 'SessionName="session_1", instance="10.0.0.1:8080", job="ray"'


def _series(name, labels, values):
    return {"series": f"{name}{{{labels}, {RAY}}}", "values": values}


def _alternate(a, b, n):
    return " ".join([a, b] * n)


def _annotations(summary, description, name):
    return {"summary": summary, "description": description, "runbook_url": f"docs/alerts.md#{name.lower()}"}


def _scenario(name, series, quiet_at=(), pending_at=None, fire_at=None, alerts_=()):
    """One promtool test: no alert at `quiet_at` / `pending_at`, `alerts_` at `fire_at`."""
    checks = [
        {"eval_time": t, "alertname": name, "exp_alerts": []}
        for t in (*quiet_at, *([pending_at] if pending_at else []))
    ]
    if fire_at:
        checks.append({"eval_time": fire_at, "alertname": name, "exp_alerts": list(alerts_)})
    return {"name": name, "interval": "1m", "input_series": series, "alert_rule_test": checks}


def _cases():
    """(rule name, firing scenario, quiet scenario) for every rule."""
    drift, ttft = "ray_raymoe_drift_alarm", "ray_raymoe_serve_ttft_seconds_bucket"
    req, tpe = "ray_raymoe_serve_requests_total", "ray_raymoe_serve_tokens_per_expert_total"
    imb, loss = "ray_raymoe_train_load_imbalance", "ray_raymoe_train_loss"
    rej = "ray_raymoe_federated_rejected_updates_total"
    chat = 'model="m1", route="/v1/chat/completions"'
    # quantile rank 99 of 100 requests/min: bucket (2.5, 5] holds 50..100, p99 = 2.5 + 2.5 * 49/50.
    # Split over two replicas so a rule without `sum by (le, model)` would report 2.485 / 4.975.
    ttft_fire = [
        _series(ttft, f'{chat}, WorkerId="{w}", le="{le}"', f"0+{inc}x30")
        for w, incs in (("a", (0, 50, 50, 50)), ("b", (0, 0, 50, 50)))
        for le, inc in zip(("1.0", "2.5", "5.0", "+Inf"), incs)
    ]
    # 98 of 100 under 1 s: rank 99 lies in (1, 2.5] holding 98..100, p99 = 1 + 1.5 * 1/2 = 1.75 s.
    ttft_quiet = [
        _series(ttft, f'{chat}, WorkerId="a", le="{le}"', f"0+{inc}x30")
        for le, inc in zip(("1.0", "2.5", "5.0", "+Inf"), (98, 100, 100, 100))
    ]
    # A model with no traffic: rate 0 in every bucket, quantile NaN, never over the SLO.
    ttft_quiet += [_series(ttft, f'model="m2", route="/v1/completions", le="{le}"', "7x30") for le in ("1.0", "+Inf")]
    # Summed over replicas, layer 0 routes 70, 10, 10, 10 tokens/min: max / mean = 70 / 25 = 2.8
    # (per replica series would give 70 / 12.5 = 5.6). Layer 1 is balanced (25 each, ratio 1).
    tpe_fire = [
        _series(tpe, f'model="m1", layer="0", expert="{e}", WorkerId="{w}"', f"0+{inc}x30")
        for w, incs in (("a", (70, 0, 10, 10)), ("b", (0, 10, 0, 0)))
        for e, inc in enumerate(incs)
    ]
    tpe_fire += [_series(tpe, f'model="m1", layer="1", expert="{e}"', "0+25x30") for e in range(4)]
    # 40, 20, 20, 20: 40 / 25 = 1.6; layer 1 idle (0 / 0 = NaN).
    tpe_quiet = [
        _series(tpe, f'model="m1", layer="0", expert="{e}"', f"0+{inc}x30") for e, inc in enumerate((40, 20, 20, 20))
    ]
    tpe_quiet += [_series(tpe, f'model="m1", layer="1", expert="{e}"', "5x30") for e in range(4)]
    return [
        # Alarm from 2m; worker a dies at 11m and worker b carries on: max by keeps one alert.
        (
            "RaymoeDriftAlarm",
            _scenario(
                "RaymoeDriftAlarm",
                [
                    _series(drift, 'run="r1", detector="psi", feature="prompt_len", WorkerId="a"', "0 0 1x8 stale"),
                    _series(drift, 'run="r1", detector="psi", feature="prompt_len", WorkerId="b"', "_x11 1x12"),
                    _series(drift, 'run="r1", detector="psi", feature="topic"', "0x22"),
                ],
                pending_at="11m",
                fire_at="12m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "run": "r1", "detector": "psi", "feature": "prompt_len"},
                        "exp_annotations": _annotations(
                            "Drift on feature prompt_len of run r1",
                            "The psi detector has been over its threshold on feature prompt_len of run r1."
                            " Held for 10m.",
                            "RaymoeDriftAlarm",
                        ),
                    }
                ],
            ),
            # Flapping 1 / 0 every minute never holds for 10m.
            _scenario(
                "RaymoeDriftAlarm",
                [_series(drift, 'run="r1", detector="ks", feature="prompt_len"', _alternate("1", "0", 15))],
                quiet_at=("10m", "20m", "29m"),
            ),
        ),
        # Rate defined from 1m, so pending until 5m, firing at 6m.
        (
            "RaymoeServeTTFTP99OverSLO",
            _scenario(
                "RaymoeServeTTFTP99OverSLO",
                ttft_fire,
                pending_at="5m",
                fire_at="6m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "model": "m1"},
                        "exp_annotations": _annotations(
                            "p99 time to first token of m1 is over 2s",
                            "p99 TTFT of model m1 is 4.95s over the last 5m (SLO 2s). Held for 5m.",
                            "RaymoeServeTTFTP99OverSLO",
                        ),
                    }
                ],
            ),
            _scenario("RaymoeServeTTFTP99OverSLO", ttft_quiet, quiet_at=("10m", "30m")),
        ),
        # 85 x 200, 5 x 404, 10 x 503 per minute: 10 / 100 = 10 % (a 404 is the client's error).
        (
            "RaymoeServeErrorRatio",
            _scenario(
                "RaymoeServeErrorRatio",
                [
                    _series(req, f'{chat}, status="{s}"', f"0+{inc}x20")
                    for s, inc in (("200", 85), ("404", 5), ("503", 10))
                ],
                pending_at="5m",
                fire_at="6m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "critical", "model": "m1"},
                        "exp_annotations": _annotations(
                            "Model m1 answers 10% of requests with 5xx",
                            "10% of requests to model m1 failed with a 5xx status over the last 5m"
                            " (bound 5%). Held for 5m.",
                            "RaymoeServeErrorRatio",
                        ),
                    }
                ],
            ),
            # 96 x 200, 2 x 404, 2 x 500: 2 %; m2 never fails (no 5xx series at all).
            _scenario(
                "RaymoeServeErrorRatio",
                [
                    _series(req, f'{chat}, status="{s}"', f"0+{inc}x20")
                    for s, inc in (("200", 96), ("404", 2), ("500", 2))
                ]
                + [_series(req, 'model="m2", route="/v1/completions", status="200"', "0+50x20")],
                quiet_at=("6m", "20m"),
            ),
        ),
        # Rate from 1m, `for: 15m`: pending at 15m, firing at 16m.
        (
            "RaymoeServeExpertImbalance",
            _scenario(
                "RaymoeServeExpertImbalance",
                tpe_fire,
                pending_at="15m",
                fire_at="16m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "model": "m1", "layer": "0"},
                        "exp_annotations": _annotations(
                            "Expert load imbalance in layer 0 of m1",
                            "The busiest expert of MoE layer 0 of model m1 routes 2.80x the mean tokens"
                            " per expert (bound 2x). Held for 15m.",
                            "RaymoeServeExpertImbalance",
                        ),
                    }
                ],
            ),
            _scenario("RaymoeServeExpertImbalance", tpe_quiet, quiet_at=("16m", "30m")),
        ),
        # 2.5 from 1m: firing at 16m.
        (
            "RaymoeTrainExpertImbalance",
            _scenario(
                "RaymoeTrainExpertImbalance",
                [_series(imb, 'run="r1", layer="3"', "1.5 2.5x20"), _series(imb, 'run="r1", layer="4"', "1.2x21")],
                pending_at="15m",
                fire_at="16m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "run": "r1", "layer": "3"},
                        "exp_annotations": _annotations(
                            "Expert load imbalance in layer 3 of run r1",
                            "Max over mean tokens per expert in MoE layer 3 of training run r1 is 2.50"
                            " (bound 2). Held for 15m.",
                            "RaymoeTrainExpertImbalance",
                        ),
                    }
                ],
            ),
            # Just under the bound throughout; a 3.0 spike lasting 6m, under `for: 15m`.
            _scenario(
                "RaymoeTrainExpertImbalance",
                [_series(imb, 'run="r1", layer="3"', "1.9x30"), _series(imb, 'run="r1", layer="4"', "1.5 3x5 1.5x24")],
                quiet_at=("6m", "30m"),
            ),
        ),
        # r1 NaN and r2 +Inf from 2m; `for: 1m`: pending at 2m, firing at 3m.
        (
            "RaymoeTrainLossNotFinite",
            _scenario(
                "RaymoeTrainLossNotFinite",
                [
                    _series(loss, 'run="r1"', "2.5 2.4 NaN NaN NaN NaN"),
                    _series(loss, 'run="r2"', "2.5 2.4 +Inf +Inf +Inf +Inf"),
                    _series(loss, 'run="r3"', "2.5 2.4 2.3 2.2 2.1 2.0"),
                ],
                pending_at="2m",
                fire_at="3m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "critical", "run": r},
                        "exp_annotations": _annotations(
                            f"Training loss of run {r} is NaN or infinite",
                            f"The training loss of run {r} is NaN or infinite: the run has diverged and"
                            " every later step is wasted. Held for 1m.",
                            "RaymoeTrainLossNotFinite",
                        ),
                    }
                    for r in ("r1", "r2")
                ],
            ),
            _scenario("RaymoeTrainLossNotFinite", [_series(loss, 'run="r1"', "10-0.1x30")], quiet_at=("2m", "30m")),
        ),
        # Minimum 2.0 until 19m, then 3.0 from 20m: 3 / 2 = 1.5 from 20m, firing at 35m.
        (
            "RaymoeTrainLossRising",
            _scenario(
                "RaymoeTrainLossRising",
                [_series(loss, 'run="r1", WorkerId="a"', "3 2.5 2x17 3x25")],
                pending_at="34m",
                fire_at="35m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "run": "r1"},
                        "exp_annotations": _annotations(
                            "Training loss of run r1 is rising",
                            "The training loss of run r1 is 1.50x its minimum of the last hour"
                            " (bound 1.2x). Held for 15m.",
                            "RaymoeTrainLossRising",
                        ),
                    }
                ],
            ),
            # r1: a noisy plateau, 2.2 / 2.0 = 1.1; r2: a spike to 1.5x that recovers after 10m.
            _scenario(
                "RaymoeTrainLossRising",
                [
                    _series(loss, 'run="r1"', "3 2.5 " + _alternate("2", "2.2", 20)),
                    _series(loss, 'run="r2"', "2x9 3x9 2x22"),
                ],
                quiet_at=("15m", "25m", "41m"),
            ),
        ),
        # late + non_finite each +1/min: increase over 15m = 2t for t <= 15m, > 5 from 3m, firing
        # at 8m with 16 (the window starts at the series' first sample: no extrapolation).
        (
            "RaymoeFederatedRejectedUpdates",
            _scenario(
                "RaymoeFederatedRejectedUpdates",
                [_series(rej, f'run="f1", reason="{r}"', "0+1x20") for r in ("late", "non_finite")],
                pending_at="7m",
                fire_at="8m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "run": "f1"},
                        "exp_annotations": _annotations(
                            "Federated run f1 is rejecting silo updates",
                            "About 16 silo updates of federated run f1 were rejected in the last 15m"
                            " (bound 5). Held for 5m.",
                            "RaymoeFederatedRejectedUpdates",
                        ),
                    }
                ],
            ),
            # One late silo every 5 minutes: 3 per 15m.
            _scenario(
                "RaymoeFederatedRejectedUpdates",
                [_series(rej, 'run="f1", reason="late"', " ".join(str(i // 5) for i in range(40)))],
                quiet_at=("10m", "20m", "39m"),
            ),
        ),
        # Down from 2m: pending at 3m, firing at 4m, labels instance and job kept.
        (
            "RaymoeTargetDown",
            _scenario(
                "RaymoeTargetDown",
                [
                    {"series": 'up{instance="10.0.0.2:8080", job="ray"}', "values": "1 1 0x10"},
                    {"series": 'up{instance="10.0.0.3:8080", job="ray"}', "values": "1x12"},
                ],
                pending_at="3m",
                fire_at="4m",
                alerts_=[
                    {
                        "exp_labels": {"severity": "warning", "instance": "10.0.0.2:8080", "job": "ray"},
                        "exp_annotations": _annotations(
                            "Scrape target 10.0.0.2:8080 of job ray is down",
                            "Prometheus cannot scrape 10.0.0.2:8080 (job ray): its metrics, and the alerts"
                            " on them, are blind. Held for 2m.",
                            "RaymoeTargetDown",
                        ),
                    }
                ],
            ),
            # One failed scrape a minute apart never lasts 2m.
            _scenario(
                "RaymoeTargetDown",
                [{"series": 'up{instance="10.0.0.2:8080", job="ray"}', "values": _alternate("1", "0", 10)}],
                quiet_at=("5m", "19m"),
            ),
        ),
    ]


def test_committed_rules_equal_a_fresh_render():
    assert RULES.read_text() == alerts.render(), (
        "stale rule file: run `python -m raymoe.monitor.alerts --out dashboards/alerts/raymoe-alerts.rules.yml`"
    )


def test_generator_writes_the_rule_file(tmp_path):
    out = tmp_path / "rules.yml"
    subprocess.run([sys.executable, "-m", "raymoe.monitor.alerts", "--out", str(out)], check=True, capture_output=True)
    assert out.read_text() == RULES.read_text()


def test_every_metric_a_rule_names_is_in_the_registry():
    used = alerts.check_rules_reference_registry()
    assert used == {
        "ray_raymoe_drift_alarm",
        "ray_raymoe_serve_ttft_seconds_bucket",
        "ray_raymoe_serve_requests_total",
        "ray_raymoe_serve_tokens_per_expert_total",
        "ray_raymoe_train_load_imbalance",
        "ray_raymoe_train_loss",
        "ray_raymoe_federated_rejected_updates_total",
        "up",
    }


def test_a_rule_on_a_missing_metric_is_refused():
    expr = 'sum by (le) (rate(ray_raymoe_serve_ttft_second_bucket{route="x"}[5m])) > 1 and on (job) up == 1'
    bad = {"g": [alerts.AlertRule("Typo", expr, "1m", "warning", "s", "d")]}
    with pytest.raises(ValueError, match="Typo: ray_raymoe_serve_ttft_second_bucket"):
        alerts.check_rules_reference_registry(bad)


def test_metric_names_skips_functions_labels_durations_and_numbers():
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{status=~"5.."}[5m] offset 1h)))'
        " > 2e-3 or b != b or c == Inf unless d"
    )
    assert alerts.metric_names(expr) == {"a_bucket", "b", "c", "d"}


def test_every_alert_has_a_runbook_section():
    doc = (ROOT / "docs" / "alerts.md").read_text()
    for rules in alerts.build_groups().values():
        for rule in rules:
            assert f"## {rule.name}\n" in doc, rule.name


@needs_promtool
def test_promtool_check_rules_passes():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout


@needs_promtool
def test_promtool_every_rule_fires_and_stays_quiet(tmp_path):
    # Prepare: a firing (with a pending check before `for:` has passed) and a quiet scenario per rule.
    cases = _cases()
    names = {r.name for rules in alerts.build_groups().values() for r in rules}
    assert {name for name, _, _ in cases} == names
    tests = [scenario for _, fire, quiet in cases for scenario in (fire, quiet)]
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}
    test_file = tmp_path / "raymoe-alerts.test.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    # Execute
    out = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True)
    # Assert
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
