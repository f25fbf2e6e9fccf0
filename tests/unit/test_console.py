"""The jobs' console: a stage's output goes to its log (the demo) or passes through (a pipeline run
alone), its step lines move its bar, and it ends with one line (✓, or ✗ and the error going on)."""

import io
import logging
import sys

import pytest

from raymoe.console import Console, _StageStream


class Terminal(io.StringIO):
    def isatty(self):
        return False


def make_console(tmp_path):
    out, err = Terminal(), Terminal()
    return Console(tmp_path / "logs", out=out, err=err), out, err


def test_a_stage_prints_one_line_and_its_output_goes_to_its_log(tmp_path):
    # Prepare
    console, out, _ = make_console(tmp_path)
    logger = logging.getLogger("test_demo_progress")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        # Execute: the stage prints, writes to stderr and logs through a console handler.
        with console.stage("train", total=30) as stage:
            print("(RayTrainWorker pid=7) step 20/30  loss 6.6270")
            print("to stderr", file=sys.stderr)
            logger.warning("a warning")
            at = stage.bar.n
            stage.summary = "30 steps"
    finally:
        logger.removeHandler(handler)
    # Assert: the bar followed the step line; the console got only the result line; the log all.
    assert at == 20
    assert out.getvalue().startswith("✓ train: 30 steps (") and out.getvalue().count("\n") == 1
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "step 20/30" in log and "to stderr" in log and "a warning" in log
    assert handler.stream is sys.stderr  # given back


def test_a_failed_stage_says_so_with_the_log_and_the_error_goes_on(tmp_path):
    # Prepare
    console, out, err = make_console(tmp_path)

    # Execute
    def failing_stage() -> None:
        with console.stage("train", total=10):
            print("the last words")
            raise RuntimeError("training failed: worker died")

    with pytest.raises(RuntimeError, match="training failed"):
        failing_stage()
    # Assert: no ✓ line; the ✗ line names the stage and the error, then the log's tail and path.
    assert out.getvalue() == ""
    text = err.getvalue()
    assert "✗ train failed after" in text and "training failed: worker died" in text
    assert "the last words" in text and str(tmp_path / "logs" / "train.log") in text
    assert "Traceback" in (tmp_path / "logs" / "train.log").read_text()


def test_reused_and_verbose_stages(tmp_path):
    # Prepare
    console, out, _ = make_console(tmp_path)
    loud = Console(tmp_path / "loud", verbose=True, out=out, err=Terminal())
    # Execute
    console.reused("ingest", "175 documents")
    with loud.stage("export") as stage:
        stage.summary = "step 30"
    # Assert: verbose writes no log and draws no bar.
    lines = out.getvalue().splitlines()
    assert lines[0] == "↺ ingest: reused (175 documents)"
    assert lines[1] == "▶ export" and lines[2].startswith("✓ export: step 30 (")
    assert not (tmp_path / "loud").exists()


def test_the_stage_stream_hands_over_whole_lines_and_falls_back_to_the_console():
    # Prepare
    console, log, seen = io.StringIO(), io.StringIO(), []
    stream = _StageStream(console)
    stream.route(log, seen.append)
    # Execute: a line in three writes, then two lines in one; then the stage ends.
    stream.write("step 1")
    stream.write("0/30 loss")
    stream.write(" 7.0\nstep 20/30\nstep 3")
    stream.route(None)
    stream.write("between stages\n")
    # Assert
    assert seen == ["step 10/30 loss 7.0", "step 20/30"]
    assert log.getvalue() == "step 10/30 loss 7.0\nstep 20/30\nstep 3"
    assert console.getvalue() == "between stages\n"


def test_a_logger_set_up_during_a_stage_writes_to_the_next_stages_log(tmp_path):
    # Prepare: a library configures its console logger while the first stage runs (as Ray does
    # when it is imported): its handler holds the stage's stand-in for sys.stderr.
    console, _out, err = make_console(tmp_path)
    logger = logging.getLogger("test_demo_progress.late")
    with console.stage("ingest"):
        handler = logging.StreamHandler(sys.stderr)
        logger.addHandler(handler)
    try:
        # Execute
        with console.stage("train"):
            logger.warning("from the train stage")
        logger.warning("after the stages")
    finally:
        logger.removeHandler(handler)
    # Assert: each line where it belongs, nothing lost to a closed file.
    assert "from the train stage" in (tmp_path / "logs" / "train.log").read_text()
    assert "from the train stage" not in (tmp_path / "logs" / "ingest.log").read_text()
    assert "after the stages" in err.getvalue() and "Logging error" not in err.getvalue()


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_pipeline_stage_passes_its_output_through_and_ends_with_one_line():
    # Prepare: no log directory (a pipeline run alone), stderr not a terminal (a job's log).
    out, err = Terminal(), Terminal()
    console = Console(out=out, err=err)
    # Execute
    with console.stage("train", total=30) as stage:
        print("(RayTrainWorker pid=7) step 20/30  loss 6.6270")
        print("a warning", file=sys.stderr)
        stage.summary = "30 steps"
    # Assert: each line on its own stream as written, no bar drawn, then the result line.
    assert stage.bar is None
    lines = out.getvalue().splitlines()
    assert lines[0] == "(RayTrainWorker pid=7) step 20/30  loss 6.6270"
    assert lines[1].startswith("✓ train: 30 steps (") and len(lines) == 2
    assert err.getvalue() == "a warning\n"


def test_on_a_terminal_the_output_goes_above_the_bar_and_moves_it():
    # Prepare
    out, err = Tty(), Tty()
    console = Console(out=out, err=err)
    # Execute: a line in two writes.
    with console.stage("finetune", total=10) as stage:
        print("step 4/10 ", end="")
        print("loss 2.5")
        at = stage.bar.n
        stage.summary = "10 steps"
    # Assert: the whole line reached the console once; the bar followed it and went to stderr.
    assert at == 4
    assert out.getvalue().count("step 4/10 loss 2.5\n") == 1
    assert out.getvalue().splitlines()[-1].startswith("✓ finetune: 10 steps (")
    assert "finetune" in err.getvalue()


def test_a_failed_pipeline_stage_says_so_and_the_error_goes_on():
    out, err = Terminal(), Terminal()
    console = Console(out=out, err=err)
    with pytest.raises(RuntimeError, match="worker died"), console.stage("train"):
        raise RuntimeError("worker died")
    assert out.getvalue() == ""
    assert err.getvalue().startswith("✗ train failed after 0 s: worker died")
