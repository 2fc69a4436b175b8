"""Progress on the long commands: blip3v.progress.StepBar moves by each step's share (parts and
steps added later included), and the real CLI draws one bar with an ETA on stderr, and nothing
there with --quiet (`blip3v export` on a tiny checkpoint, `blip3v bench budget` on the demo model
at its smallest settings)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli

# tqdm's bar as StepBar draws it: "desc (step):  40%|####  | [00:01<00:02]" (elapsed<remaining)
BAR = re.compile(r"\d+%\|.*\| \[\d+:\d+<(\d+:\d+|\?)")


def test_step_bar_moves_by_shares():
    from blip3v.progress import StepBar

    bar = StepBar({"load": 1.0, "export": 3.0}, desc="t", enabled=False)
    with bar.step("load"):
        pass
    assert bar.fraction == pytest.approx(0.25)
    with bar.part("export", {"trace": 1.0, "check": 1.0}) as part:
        with part.step("trace", total=4) as advance:
            advance(2)  # half of trace = a quarter of export's 3/4
            assert bar.fraction == pytest.approx(0.25 + 0.75 / 4)
        assert bar.fraction == pytest.approx(0.25 + 0.75 / 2)  # a step's unreported rest lands at its end
    bar.add({"runs": 4.0})  # now 8 units in all, 4 done
    assert bar.fraction == pytest.approx(0.5)
    with bar.step("runs", total=3) as advance:
        for _ in range(5):  # more than the total: capped at the step's share
            advance(1)
    assert bar.fraction == 1.0
    with pytest.raises(ValueError):
        bar.add({"runs": 1.0})
    with pytest.raises(ValueError):
        StepBar({"x": 0.0}, desc="t", enabled=False)
    bar.close()


def test_step_bar_draws_on_stderr_only_when_enabled(capsys):
    from blip3v.progress import StepBar

    with StepBar({"a": 1.0}, desc="quiet", enabled=False) as bar, bar.step("a"):
        pass
    assert capsys.readouterr().err == ""
    with StepBar({"a": 1.0}, desc="shown", enabled=True) as bar, bar.step("a"):
        bar.write("a log line")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "a log line" in captured.err and "shown (a)" in captured.err and BAR.search(captured.err)


@pytest.mark.slow  # two exports of the tiny checkpoint: 1-4 minutes each on the shared 2-core box
def test_export_shows_a_bar_and_is_silent_with_quiet(tiny_ckpt, tmp_path):
    shown = run_cli("export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "a"), timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert BAR.search(shown.stderr), shown.stderr[-2000:]
    assert "export (decoder.onnx)" in shown.stderr  # the step beside the bar
    assert "decoder.onnx (" in shown.stderr and "max abs diff" in shown.stderr  # the step lines stay
    quiet = run_cli("export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--quiet", timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    assert "max abs diff" in quiet.stdout  # the result line, on stdout


@pytest.mark.slow  # 5-40 s each: torch's imports and the demo model on the shared 2-core box
def test_bench_budget_shows_a_bar_and_states_its_memory():
    args = ("bench", "budget", "--budgets", "16", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
            "--threads", "1")
    shown = run_cli(*args, timeout=600)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert BAR.search(shown.stderr) and "bench budget (start-up)" in shown.stderr, shown.stderr[-2000:]
    assert "bench budget (runs)" in shown.stderr
    expected = shown.stderr.index("expected peak memory")
    assert expected < shown.stderr.index("bench budget (model)")  # stated before the model is made
    assert re.search(r"peak memory: [\d.]+ GiB measured", shown.stdout)
    quiet = run_cli(*args, "--quiet", "--json", timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    memory = json.loads(quiet.stdout)["memory"]
    assert 0 < memory["peak_rss_gib"] < 8 and 0 < memory["expected_gib"]["peak"] < 8
