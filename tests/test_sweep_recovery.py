"""Sweeps that are interrupted, killed, run twice at once, or lose MLflow: real processes.

Every scenario here runs real ``rrscale tune`` processes on a local Ray (real Optuna, real
sqlite MLflow or a real ``mlflow server``), so the module is ``slow``; each scenario checks as
much as one run can honestly show.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.scale_fixtures import (
    RayEnv,
    _results,
    end_processes,
    ray_env,  # noqa: F401  (fixture)
    run_cli,
    sweep_runs,
    sweep_yaml,
)

pytestmark = pytest.mark.slow


def _sweep_dir(env: RayEnv, name: str) -> Path:
    return env.tmp / "ray_results" / name


def _complete_trials(db: Path) -> int:
    """COMPLETE trials in an Optuna sqlite study, read without disturbing the writer."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as con:
            return int(con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _fresh_shell(env: RayEnv) -> dict[str, str]:
    """A new shell: none of rrscale's or MLflow's variables (only Ray's isolation of this test)."""
    out = env.env()
    for key in list(out):
        if key.startswith(("RRSCALE_", "MLFLOW_TRACKING")):
            del out[key]
    return out


def _run_printed(command: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command exactly as rrscale printed it (``rrscale`` is this interpreter's entry point)."""
    argv = shlex.split(command)
    assert argv[0] == "rrscale", command
    return subprocess.run([sys.executable, "-m", "rrscale.cli", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _printed(text: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(rrscale .+)$", text, re.M)
    assert match, f"no '{label}' line in:\n{text[-3000:]}"
    return match.group(1).strip()


# ----------------------------------------------------------------------------- Ctrl-C, SIGKILL, resume


@pytest.mark.timeout(900, method="thread")
def test_ctrl_c_then_sigkill_at_a_completion_then_resume_in_a_new_shell(ray_env: RayEnv) -> None:
    """Ctrl-C marks the unfinished trials "interrupted" and prints a resume command; that
    command, pasted into a new shell (no --set, no environment), continues the sweep; a SIGKILL
    the instant the 2nd trial became COMPLETE in optuna.db (Tune's snapshot then lags the study)
    leaves a sweep that the printed command again resumes, with Tune, Optuna and MLflow agreeing:
    each trial once, none re-trained, nothing left RUNNING, trials.csv written."""
    name = "killed"
    path = sweep_yaml(ray_env.tmp, name, tune={"scheduler": "none", "num_samples": 4, "max_concurrent_trials": 2})
    sweep = _sweep_dir(ray_env, name)
    db = ray_env.mlflow_db
    # The first run has what a new shell lacks: --set overrides and MLFLOW_TRACKING_URI.
    first = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "tune", str(path), "--set", "train.epochs=3",
                              "--set", "method.head_width=24"], cwd=ray_env.tmp, env=ray_env.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(_results(d) for d in sweep.glob("*/")):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    resume = _printed(out, "continue the sweep:")
    assert resume == f"rrscale tune --resume {sweep}"
    parents, children = sweep_runs(f"sqlite:///{db}")
    assert [p.data.tags.get("rrscale.status") for p in parents] == ["interrupted"]
    assert children and all(c.info.status != "RUNNING" for c in children)
    assert "interrupted" in {c.data.tags.get("rrscale.status") for c in children}
    assert "Traceback" not in out + err
    resolved = yaml.safe_load((sweep / "experiment.yaml").read_text())
    assert resolved["train"]["epochs"] == 3 and resolved["tune"]["storage_path"] == str(sweep.parent)
    assert resolved["mlflow"]["tracking_uri"] == ray_env.tracking_uri

    # The printed command in a new shell, killed the instant the 2nd trial is COMPLETE.
    elsewhere = ray_env.tmp / "elsewhere"
    elsewhere.mkdir()
    argv = shlex.split(resume)
    second = subprocess.Popen([sys.executable, "-m", "rrscale.cli", *argv[1:]], cwd=elsewhere,
                              env=_fresh_shell(ray_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _complete_trials(sweep / "optuna.db") < 2:
            assert second.poll() is None, second.communicate()[1][-3000:]
            time.sleep(0.01)
        assert _complete_trials(sweep / "optuna.db") >= 2, "no 2nd trial completed in time"
        os.kill(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
    finally:
        if second.poll() is None:
            second.kill()
    end_processes(str(ray_env.ray_tmp), f"RAY_AUTH_TOKEN={ray_env.token}")  # the dead driver's Ray
    complete_at_kill = {t.number: t.value for t in optuna.load_study(
        study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}").trials if t.state.name == "COMPLETE"}
    lines_at_kill = {d.name: len(_results(d)) for d in sweep.glob("*/") if _results(d)}

    third = _run_printed(resume, _fresh_shell(ray_env), elsewhere, timeout=420)
    assert third.returncode == 0, third.stderr[-3000:] + third.stdout[-3000:]
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == 4 and len(set(ids)) == 4 and all(r["status"] == "finished" for r in rows), rows
    assert (sweep / "trials.csv").read_text().count("\n") == 5
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4  # each trial once, none lost
    assert sorted(t.value for t in study.trials) == sorted(r["probe_top1"] for r in rows)
    for number, value in complete_at_kill.items():
        assert study.trials[number].value == value
    for trial, count in lines_at_kill.items():  # a trial Optuna had seen finish was not trained again
        results = _results(sweep / trial)
        if trial in ids and any(r.get("final") for r in results[:count]):
            assert not any(r.get("epoch") for r in results[count:]), trial
    parents, children = sweep_runs(f"sqlite:///{db}")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["rrscale.trial_id"] for c in children) == sorted(ids)  # each trial once
    assert all(c.info.status == "FINISHED" for c in children)

    runs = _run_printed(_printed(third.stdout, "compare the trials:"), _fresh_shell(ray_env), elsewhere)
    assert runs.returncode == 0 and all(i in runs.stdout for i in ids), runs.stdout + runs.stderr[-2000:]

    # "run the best alone", pasted into a new shell, trains exactly the best trial's config.
    alone = _printed(third.stdout, "run the best alone:")
    ran = _run_printed(alone + " --out " + str(ray_env.tmp / "alone"), _fresh_shell(ray_env), elsewhere)
    assert ran.returncode == 0, ran.stderr[-3000:]
    best = json.loads((sweep / "sweep.json").read_text())["summary"]["best_trial_id"]
    final = next(r for r in _results(sweep / best) if r.get("final"))
    assert json.loads((ray_env.tmp / "alone" / "summary.json").read_text())["config_hash"] == final["config_hash"]


# ----------------------------------------------------------------------------- two sweeps at once


def _dashboard_port(text: str) -> int:
    match = re.search(r"^ray: dashboard http://127\.0\.0\.1:(\d+)", text, re.M)
    assert match, text[-2000:]
    return int(match.group(1))


@pytest.mark.timeout(600, method="thread")
def test_two_sweeps_at_once_a_third_with_a_taken_name_and_mlflow_dying_mid_sweep(ray_env: RayEnv) -> None:
    """Sweeps a and b start together and both finish: b gets another dashboard port when a holds
    the preferred one. A second 'a' is refused in one line (exit 2) while a runs. b's MLflow
    server is killed once b logged an epoch: said once, and b finishes untracked within seconds
    per call, not minutes. In a, a trial whose process dies (os._exit) is retried and finishes."""
    import mlflow

    from tests.tracking_fixtures import start_mlflow_server, stop_mlflow_server

    server, url = start_mlflow_server(ray_env.tmp / "server")
    tiny = {"scheduler": "none", "num_samples": 2, "max_concurrent_trials": 2}
    path_a = sweep_yaml(ray_env.tmp, "a", tune=tiny)
    path_b = sweep_yaml(ray_env.tmp, "b", train={"epochs": 6}, tune=tiny)
    marker = ray_env.tmp / "crashed.json"
    common = dict(cwd=ray_env.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "tune", str(path_a)],
                         env=ray_env.env(RRSCALE_TEST_CRASH=f"rank=0,epoch=1,delay=0,marker={marker}"), **common)
    b = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "tune", str(path_b), "--set",
                          f"mlflow.tracking_uri={url}"], env=ray_env.env(), **common)
    try:
        lock = _sweep_dir(ray_env, "a") / ".rrscale.lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
            time.sleep(0.1)
        again = subprocess.Popen([sys.executable, "-m", "rrscale.cli", "tune", str(path_a)], env=ray_env.env(),
                                 **common)
        client = mlflow.tracking.MlflowClient(url)
        deadline, logged = time.time() + 240, False
        while time.time() < deadline and not logged:
            assert b.poll() is None, b.communicate()
            exp = client.get_experiment_by_name("rrscale-tests")
            logged = bool(exp) and any("epoch/knn_top1" in r.data.metrics  # an epoch, not a trial's end
                                        for r in client.search_runs([exp.experiment_id]))
            time.sleep(0.5)
        assert logged, "no epoch of b reached MLflow"
        stop_mlflow_server(server)
        killed_at = time.time()
        out_b, err_b = b.communicate(timeout=420)
        after_kill = time.time() - killed_at
        out_a, err_a = a.communicate(timeout=420)
        again_out, again_err = again.communicate(timeout=120)
    finally:
        for proc in (a, b, again):
            if proc.poll() is None:
                proc.kill()
        stop_mlflow_server(server)
    assert again.returncode == 2, again_err[-2000:]
    assert again_err.count("\n") == 1 and "is running in another process" in again_err, again_err
    assert "ray:" not in again_out  # no Ray was started for it
    assert a.returncode == 0, err_a[-3000:]
    assert b.returncode == 0, err_b[-3000:]
    ports = {_dashboard_port(out_a), _dashboard_port(out_b)}
    assert len(ports) == 2 and ray_env.dashboard_port in ports
    for name in ("a", "b"):  # neither mixed its trials into the other's
        rows = json.loads((_sweep_dir(ray_env, name) / "sweep.json").read_text())["rows"]
        assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), rows
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{_sweep_dir(ray_env, name) / 'optuna.db'}")
        assert len(study.trials) == 2
    # a: the trial process that died once was retried (a lost process is worth another try)
    assert json.loads(marker.read_text())["epoch"] == 1
    assert any("Failure # 1" in p.read_text() for p in _sweep_dir(ray_env, "a").glob("*/error.txt"))
    parents, children = sweep_runs(f"sqlite:///{ray_env.mlflow_db}")
    assert len(parents) == 1 and parents[0].data.tags["rrscale.sweep"] == "a" and len(children) == 2
    # b: one line about the lost server, no retry chatter, and no minutes lost per call
    said = [ln for ln in (out_b + err_b).splitlines()
            if url in ln and ("failed" in ln or "answer" in ln) and "stay RUNNING" not in ln]
    assert len(said) == 1 and "does not answer" in said[0], (out_b + err_b)[-5000:]
    assert "Retrying" not in err_b
    assert after_kill < 150, after_kill
    # b's trials ended while the server was down: their runs stay open, b says so and how to
    # close them; once the server is back at the same URI, that command closes them with their numbers
    store = ray_env.tmp / "server" / "server.db"
    assert sum("stay RUNNING" in ln and "rrscale tune --resume" in ln for ln in out_b.splitlines()) == 1, out_b
    _, kids = sweep_runs(f"sqlite:///{store}")
    assert any(c.info.status == "RUNNING" for c in kids)
    server, _ = start_mlflow_server(ray_env.tmp / "server", port=int(url.rsplit(":", 1)[1]))
    try:
        resumed = run_cli(ray_env, "tune", "--resume", str(_sweep_dir(ray_env, "b")), timeout=240)
    finally:
        stop_mlflow_server(server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stay RUNNING" not in resumed.stdout
    parents, kids = sweep_runs(f"sqlite:///{store}")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(kids) == 2
    assert all(c.info.status == "FINISHED" and "probe_top1" in c.data.metrics for c in kids), kids


_START_SWEEP = """
import sys, time
from pathlib import Path
from rrscale.tracking import mlflow as trk
Path(sys.argv[2] + "." + sys.argv[3]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
print(trk.start_sweep("race", f"sqlite:///{sys.argv[1]}", sys.argv[3], None, {"a": 1}, False))
"""


@pytest.mark.timeout(300, method="thread")
def test_three_processes_creating_one_new_mlflow_db_all_keep_their_record(tmp_path: Path) -> None:
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_DISABLE_TELEMETRY": "true"}
    names = [f"sweep-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _START_SWEEP, str(db), str(go), n], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names]
    deadline = time.time() + 200
    while time.time() < deadline and not all(Path(f"{go}.{n}").exists() for n in names):
        time.sleep(0.05)
    go.touch()  # all three past their imports: they start at the same instant
    outs = [p.communicate(timeout=240) for p in procs]
    ids = [out.strip().splitlines()[-1] if out.strip() else "" for out, _ in outs]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), outs
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
