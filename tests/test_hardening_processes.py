"""Hardening (issue 8) scenarios that need real processes: a second run into a busy run
directory, and a SIGKILL in the middle of a checkpoint write followed by a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrscale.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RUN = [
    "--set", "data.name=synthetic", "--set", "data.synthetic_size=200", "--set", "data.knn_subset=100",
    "--set", "method.K=3", "--set", "train.batch_size=50", "--set", "probe.epochs=1",
    "--set", "train.knn_every=0", "--set", "train.progress=false",
]
# Runs `rrscale` in a child that SIGKILLs itself inside its KILL_AT-th checkpoint write: after
# the temporary file is complete and before it replaces checkpoint.pt, the worst moment.
KILL_IN_CHECKPOINT_WRITE = """
import os, signal, sys
real_replace, writes = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("checkpoint.pt"):
        writes[0] += 1
        if writes[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from rrscale.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_second_train_into_a_busy_run_dir_is_refused(tmp_path: Path, capsys) -> None:
    """Item 7: while one `rrscale train` runs, another into the same --out exits 2 at once."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "train", *RUN, "--set", "train.epochs=500",
                              "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first one holds the lock and trains
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert main(["train", *RUN, "--set", "train.epochs=500", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by another rrscale run (pid {first.pid})" in err
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    epochs = _epochs(out)
    assert epochs == list(range(1, len(epochs) + 1))  # written by one process only


def test_sigkill_in_a_checkpoint_write_then_resume(tmp_path: Path) -> None:
    """Item 8: kill during the 2nd checkpoint write (checkpoint_every 2, so epochs 3-4 are ahead
    of the epoch-2 checkpoint); the resumed run leaves epochs 1..6 once each and no temp file."""
    out = tmp_path / "run"
    args = ["train", *RUN, "--set", "train.epochs=6", "--set", "train.checkpoint_every=2", "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE, *args], capture_output=True,
                            text=True, env={**os.environ, "KILL_AT": "2"}, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _epochs(out) == [1, 2, 3, 4] and list(out.glob("checkpoint-*.tmp"))
    assert main(args) == 0
    assert _epochs(out) == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["resumed"]["from_epoch"] == 2


def test_ctrl_c_is_one_line_whose_command_continues_the_run(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) during training: exit 130 and one line on stderr, no traceback; the
    command it prints, pasted into a shell elsewhere, finishes the run without retraining an epoch."""
    out = tmp_path / "run"
    args = [*RUN, "--set", "data.synthetic_size=2000", "--set", "method.K=4", "--set", "train.epochs=5"]
    first = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "train", *args, "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    done = _epochs(out)
    assert done and done[-1] < 5, done
    command = err.strip().split("continue with ", 1)[1]
    resumed = subprocess.run(["bash", "-c", command.replace("rrscale train", f"{sys.executable} -m rrscale.cli train", 1)],
                             cwd=tmp_path.parent, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _epochs(out) == [1, 2, 3, 4, 5]
