"""Plots and `raymoe report`: PNG pixel sizes, the data inside the figures, and run directories in
the formats their writers use: checkpoint manifests from the real `save_checkpoint`, a federated
metrics.json and the drift job's histories built by hand after their writers (cited per fixture).
"""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from raymoe.monitor import plots
from raymoe.monitor.run_report import (
    CHECKPOINT_MANIFEST_GLOBS,
    DRIFT_HISTORY_FILE,
    FEDERATED_METRICS_FILE,
    QUALITY_HISTORY_FILE,
    TRAIN_HISTORY_FILE,
    run_report_figures,
    write_run_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # every chunk's CRC, through IEND: a truncated file fails here
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every pixel
        return image.size


def _result(score, threshold, drifted, p_value=None):
    return {"score": score, "threshold": threshold, "drifted": drifted, "p_value": p_value}


def _drift_summary(psi_score, ks_p):
    """A `drift.summary()`-shaped digest with prompt_length psi (distance) and ks (test)."""
    detectors = {"psi": _result(psi_score, 0.1, psi_score >= 0.1), "ks": _result(0.3, 0.05, ks_p < 0.05, p_value=ks_p)}
    drifted = any(r["drifted"] for r in detectors.values())
    return {
        "drifted": drifted,
        "drifted_features": ["prompt_length"] if drifted else [],
        "features": {"prompt_length": {"drifted": drifted, "detectors": detectors}},
    }


# --- figures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dpi", [50, 120])
def test_png_is_figure_size_times_dpi(dpi):
    # Prepare
    figures = [
        plots.line_figure({"loss (nats/token)": {"train": ([1, 2, 3], [3.0, 2.5, 2.2])}}, title="loss", xlabel="step"),
        plots.expert_load_figure(np.ones((3, 5)), title="load"),
    ]
    for fig in figures:
        width_in, height_in = fig.get_size_inches()

        # Execute
        size = _png_size(plots.png_bytes(fig, dpi))

        # Assert: no tight cropping, so the pixels are the figure's inches times dpi.
        assert size == (round(width_in * dpi), round(height_in * dpi))
    # Nothing went through pyplot's global figure registry (it would keep them alive).
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_expert_load_heatmap_holds_the_counts_layers_down_experts_across():
    # Prepare: 3 MoE layers x 4 experts, every value distinct.
    counts_LE = np.arange(12).reshape(3, 4) * 7

    # Execute
    fig = plots.expert_load_figure(counts_LE, title="step 10")

    # Assert
    image = fig.axes[0].images[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), counts_LE)
    assert fig.axes[0].get_xlabel() == "expert"
    assert list(fig.axes[0].get_yticks()) == [0, 1, 2]


def test_drift_scores_plot_p_values_for_tests_scores_for_distances_and_mark_alarms():
    # Prepare: out of time order on purpose; the second window drifts on both detectors and its
    # KS p-value underflowed to 0.
    history = [
        {"time": 2000.0, "window": "b", "summary": _drift_summary(0.25, 0.0)},
        {"time": 1000.0, "window": "a", "summary": _drift_summary(0.05, 0.5)},
    ]

    # Execute
    fig = plots.drift_scores_figure(history)

    # Assert
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["prompt_length / psi", "prompt_length / ks"]
    psi_ax, ks_ax = visible
    values, thresholds = psi_ax.get_lines()
    assert list(values.get_ydata()) == [0.05, 0.25]
    assert list(thresholds.get_ydata()) == [0.1, 0.1]
    assert psi_ax.get_yscale() == "linear"
    values, thresholds = ks_ax.get_lines()
    assert list(values.get_ydata()) == [0.5, plots.P_VALUE_FLOOR]
    assert list(thresholds.get_ydata()) == [0.05, 0.05]
    assert ks_ax.get_yscale() == "log"
    for ax, alarm in ((psi_ax, 0.25), (ks_ax, plots.P_VALUE_FLOOR)):
        (markers,) = ax.collections  # only the second point alarmed
        assert markers.get_offsets()[:, 1].tolist() == [alarm]


def test_pca_projects_on_the_axis_of_largest_variance():
    # Prepare: the windows differ by 4 along x, by 1 inside each along y, and z wobbles by 0.5.
    # Centred on (2, 0.5, 0), the pooled points are (+-2, +-0.5, +-0.25) with orthogonal sign
    # patterns, so x, y, z are the principal axes, variances in the ratio 4 : 1/4 : 1/16.
    ref_ND = np.array([[0.0, 0.0, 0.25], [0.0, 1.0, -0.25]])
    cur_MD = np.array([[4.0, 0.0, -0.25], [4.0, 1.0, 0.25]])

    # Execute
    ref_N2, cur_M2, explained = plots.pca_2d(ref_ND, cur_MD)

    # Assert (an eigenvector's sign is arbitrary)
    np.testing.assert_allclose(np.abs(ref_N2), [[2.0, 0.5], [2.0, 0.5]])
    np.testing.assert_allclose(ref_N2[:, 0], -cur_M2[:, 0])
    np.testing.assert_allclose(explained, [16 / 17.25, 1 / 17.25])


def test_shared_bins_are_one_per_integer_over_both_windows():
    np.testing.assert_array_equal(plots.shared_bin_edges(np.array([1, 2, 2]), np.array([3])), [0.5, 1.5, 2.5, 3.5])


# --- run report -------------------------------------------------------------------------------


def _write_jsonl(path, records, torn_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def test_report_reads_loss_from_real_checkpoint_manifests(tmp_path):
    # Prepare: the manifests come from the real writer, with the metrics the training worker puts
    # in them (raymoe/train/worker.py: extra={..., "metrics": {"loss", "grad_norm"}}).
    from raymoe.models import MoETransformer, flavour
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.layout import ParallelLayout
    from raymoe.train.checkpoint import save_checkpoint
    from raymoe.train.checkpoint_format import step_dir_name

    model = MoETransformer(flavour("debug"))
    optimizer = torch.optim.AdamW(model.parameters())
    groups = build_groups(ParallelLayout(ep=1, dp=1))
    for step, loss in ((10, 6.5), (20, 5.25)):
        save_checkpoint(
            str(tmp_path / "checkpoints"),
            step=step,
            data_position=step,
            model=model,
            optimizer=optimizer,
            groups=groups,
            extra={"metrics": {"loss": loss, "grad_norm": 1.0}},
        )
    step_glob = CHECKPOINT_MANIFEST_GLOBS[0].split("/")[0]
    assert (tmp_path / "checkpoints" / step_dir_name(10)).match(step_glob)

    # Execute: the run dir may be the checkpoint root itself or the directory above it.
    for run_dir in (tmp_path, tmp_path / "checkpoints"):
        figures = run_report_figures(run_dir)

        # Assert
        assert list(figures) == ["loss"]
        (line,) = figures["loss"].axes[0].get_lines()
        assert list(line.get_xdata()) == [10, 20]
        assert list(line.get_ydata()) == [6.5, 5.25]


def test_report_writes_every_plot_of_a_full_run_dir(tmp_path, caplog):
    # Prepare. train-history.jsonl is the proposed format (nothing writes it yet; see run_report's
    # docstring): step 20 was logged twice (a resume redid it), the last line wins.
    load_LE = [[5, 0, 3, 8], [1, 1, 9, 5]]
    _write_jsonl(
        tmp_path / TRAIN_HISTORY_FILE,
        [
            {"time": 1.0, "step": 10, "loss": 7.0, "tokens_per_s": 900.0, "tokens_per_expert": [[1] * 4] * 2},
            {"time": 2.0, "step": 20, "loss": 9.9, "tokens_per_s": 100.0},
            {"time": 3.0, "step": 20, "loss": 6.0, "tokens_per_s": 1000.0, "tokens_per_expert": load_LE},
        ],
        torn_tail='{"time": 4.0, "step": 30, "lo',
    )
    # The drift job's histories (the lead's writer): {"time", "window", "summary"} per window.
    _write_jsonl(
        tmp_path / DRIFT_HISTORY_FILE,
        [
            {"time": 1.7e9, "window": "w1", "summary": _drift_summary(0.05, 0.5)},
            {"time": 1.7e9 + 3600, "window": "w2", "summary": _drift_summary(0.3, 0.01)},
        ],
    )
    # pipelines/drift.py check_quality: judge()'s point; exact_match only with generation on.
    _write_jsonl(
        tmp_path / QUALITY_HISTORY_FILE,
        [
            {
                "time": 1.7e9,
                "model": "m",
                "adapter": None,
                "loss": 2.48,
                "perplexity": 12.0,
                "examples": 10,
                "exact_match": 0.5,
                "decay": 1.0,
                "decayed": False,
                "baseline_time": 1.7e9,
            },
            {
                "time": 1.7e9 + 3600,
                "model": "m",
                "adapter": None,
                "loss": 2.64,
                "perplexity": 14.0,
                "examples": 10,
                "decay": 14 / 12,
                "decayed": True,
                "baseline_time": 1.7e9,
            },
        ],
    )
    out = tmp_path / "report"
    out.mkdir()
    (out / "loss.png").write_bytes(b"stale")

    # Execute
    with caplog.at_level(logging.WARNING):
        written = write_run_report(tmp_path, out)
        figures = run_report_figures(tmp_path)

    # Assert
    assert [p.name for p in written] == [
        "loss.png",
        "tokens_per_s.png",
        "expert_load.png",
        "drift_scores.png",
        "quality.png",
    ]
    for path in written:
        _png_size(path.read_bytes())
    assert sorted(os.listdir(out)) == sorted(p.name for p in written)  # no temp file left
    assert "skipped 1 line(s)" in caplog.text and "lines [4]" in caplog.text
    assert list(figures["loss"].axes[0].get_lines()[0].get_ydata()) == [7.0, 6.0]
    assert list(figures["tokens_per_s"].axes[0].get_lines()[0].get_ydata()) == [900.0, 1000.0]
    np.testing.assert_array_equal(figures["expert_load"].axes[0].images[0].get_array(), load_LE)
    perplexity_ax, decay_ax, exact_ax = figures["quality"].axes
    assert list(perplexity_ax.get_lines()[0].get_ydata()) == [12.0, 14.0]
    assert list(decay_ax.get_lines()[0].get_ydata()) == [1.0, 14 / 12]
    assert list(exact_ax.get_lines()[0].get_ydata()) == [0.5]


def test_report_reads_the_drift_history_the_drift_job_writes(tmp_path):
    # Prepare: two checks written by the real writer (drift_check.write_outputs; it reads only
    # output_dir and name from the job config), an hour apart; the second shifts prompt lengths.
    from types import SimpleNamespace

    from raymoe.monitor.drift import DriftConfig, compare_windows, summary
    from raymoe.monitor.drift_check import CheckResult, write_outputs

    rng = np.random.default_rng(3)
    reference = {"prompt_length": rng.integers(10, 200, 800)}
    cfg = SimpleNamespace(output_dir=str(tmp_path), name="drift-test")
    for hour, scale in ((0, 1), (1, 2)):
        current = {"prompt_length": rng.integers(10, 200, 800) * scale}
        meta = {"time": 1.7e9 + 3600 * hour, "current_files": [f"w{hour}.npz"], "reference": "w"}
        digest = summary(compare_windows(reference, current, DriftConfig()))
        write_outputs(cfg, CheckResult(digest, meta, reference, current))

    # Execute
    figures = run_report_figures(tmp_path)

    # Assert: the file name and record format match; psi is calm, then alarms.
    assert (tmp_path / DRIFT_HISTORY_FILE).is_file()
    assert list(figures) == ["drift_scores"]
    psi_ax = next(ax for ax in figures["drift_scores"].axes if ax.get_title() == "prompt_length / psi")
    calm, shifted = psi_ax.get_lines()[0].get_ydata()
    assert calm < 0.1 <= shifted
    assert len(psi_ax.collections[0].get_offsets()) == 1


def test_report_plots_federated_rounds(tmp_path):
    # Prepare: metrics.json as raymoe/federated/job.py run_federated writes it, its history records
    # as FederatedServer.run builds them (raymoe/federated/server.py); silo b missed round 2, silo
    # c reported no loss (its record's `v.get("loss")` is None).
    from types import SimpleNamespace

    from raymoe.federated.server import output_paths

    metrics_path = output_paths(SimpleNamespace(output_dir="x"))["metrics"]
    assert os.path.basename(metrics_path) == FEDERATED_METRICS_FILE
    history = [
        {
            "round": 1,
            "participants": ["a", "b"],
            "dropped": [],
            "rejected": {},
            "silo_loss": {"a": 5.0, "b": 6.0, "c": None},
            "train_seconds": {"a": 1.0, "b": 1.0},
            "round_seconds": 2.0,
            "eval_loss": 4.5,
        },
        {
            "round": 2,
            "participants": ["a"],
            "dropped": ["b"],
            "rejected": {},
            "silo_loss": {"a": 4.0},
            "train_seconds": {"a": 1.0},
            "round_seconds": 2.0,
            "eval_loss": 4.0,
        },
    ]
    (tmp_path / FEDERATED_METRICS_FILE).write_text(
        json.dumps({"adapter": "adapter", "rounds": 2, "history": history, "silos": {}})
    )

    # Execute
    figures = run_report_figures(tmp_path)

    # Assert
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in figures["loss"].axes[0].get_lines()
    }
    assert lines == {
        "server eval": ([1, 2], [4.5, 4.0]),
        "silo a (local)": ([1, 2], [5.0, 4.0]),
        "silo b (local)": ([1], [6.0]),
    }


def test_nothing_to_plot_names_the_directory(tmp_path):
    # A fine-tuning output_dir: metrics.json without per-round history (raymoe/train/finetune.py).
    (tmp_path / "metrics.json").write_text(json.dumps({"adapter": "a", "data": {}, "train": None}))
    with pytest.raises(FileNotFoundError, match=f"nothing to plot in {tmp_path}"):
        write_run_report(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="missing-run"):
        write_run_report(tmp_path / "missing-run", tmp_path / "out")
