"""benchmarks/leaderboard.py's scheduling helpers (the part a GPU session relies on to fit its time slot)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "leaderboard.py"


@pytest.fixture(scope="module")
def lb():
    spec = importlib.util.spec_from_file_location("leaderboard_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deadline_gives_each_study_the_time_left_and_skips_late_ones(lb):
    cmd = ["excise", "tune", "ssd", "p"]
    assert lb._with_deadline(cmd, None, 120) == cmd  # no deadline: the command as is
    build = lb._with_deadline(cmd, 540, 90)
    assert build(0) == cmd + ["--timeout", "450"]
    assert build(400) == cmd + ["--timeout", "50"]
    assert build(450) is None and build(600) is None  # less than the margin left: not started


def test_run_all_skips_jobs_whose_deadline_passed(lb, tmp_path):
    import os
    import sys
    import time

    ran = tmp_path / "ran"
    ok = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('x')"]
    jobs = [("now", lambda elapsed: ok, tmp_path / "a.log"), ("late", lambda elapsed: None, tmp_path / "b.log"),
            ("plain", ok, tmp_path / "c.log")]
    failed = lb._run_all(jobs, 1, dict(os.environ), time.perf_counter())
    assert failed == [] and ran.read_text() == "xx"  # the skipped job never started
    assert not (tmp_path / "b.log").exists()
