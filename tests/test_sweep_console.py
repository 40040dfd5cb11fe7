"""Fast tests of the sweep's own logic: ETA, the console's words, the follow-up commands, the
resolved experiment file, the sweep folder's lock and checks, trial records, retry decisions,
trials/hour, the dashboard port, and MLflow's fast failure on a refused port (real client)."""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rrscale.cli import main
from rrscale.config import ConfigError, load_config, parse_override
from rrscale.scale import progress, sweep_dir, trial_record
from rrscale.scale.cluster import pick_dashboard_port
from rrscale.scale.train import retryable
from tests.scale_fixtures import RayEnv, ray_env, sweep_yaml  # noqa: F401  (fixture)

# ----------------------------------------------------------------------------- ETA and words


def test_format_duration() -> None:
    assert progress.format_duration(0) == "0:00"
    assert progress.format_duration(59.6) == "1:00"
    assert progress.format_duration(3725) == "1:02:05"


def test_eta_from_measured_times() -> None:
    # nothing measured yet: no ETA
    assert progress.eta_seconds(epochs_left=[3], pending=1, epochs_per_trial=4, epoch_s=None, final_s=None,
                                concurrency=2) is None
    # two running trials (2 and 1 epochs left), two pending of 4 epochs; 10 s/epoch, 5 s probe,
    # two at a time: (25 + 15 + 2 * 45) / 2 = 65 s
    assert progress.eta_seconds(epochs_left=[2, 1], pending=2, epochs_per_trial=4, epoch_s=10.0, final_s=5.0,
                                concurrency=2) == pytest.approx(65.0)
    # one slot: the work adds up
    assert progress.eta_seconds(epochs_left=[2], pending=1, epochs_per_trial=4, epoch_s=10.0, final_s=5.0,
                                concurrency=1) == pytest.approx(25.0 + 45.0)
    # idle slots cannot split one trial: the longest trial bounds the time from below
    assert progress.eta_seconds(epochs_left=[10], pending=0, epochs_per_trial=10, epoch_s=1.0, final_s=0.0,
                                concurrency=8) == pytest.approx(10.0)
    # no probe measured yet: one epoch stands in for it
    assert progress.eta_seconds(epochs_left=[1], pending=0, epochs_per_trial=2, epoch_s=3.0, final_s=None,
                                concurrency=1) == pytest.approx(6.0)


def _trial(tid: str, status: str, last: dict[str, Any], **config: Any) -> Any:
    return SimpleNamespace(trial_id=tid, status=status, last_result=last, config=config)


def test_status_line_counts_best_and_eta() -> None:
    view = progress.SweepProgress(num_samples=4, epochs=4, concurrency=2, metric="probe_top1", mode="max",
                                  schedule_metric="knn_top1")
    view.started = 100.0
    view.epoch_times, view.final_times = [2.0, 2.0], [1.0]
    trials = [
        _trial("a", "TERMINATED", {"final": True, "epochs": 4, "probe_top1": 0.31, "metric_source": "probe_top1"}),
        _trial("b", "TERMINATED", {"epoch": 1, "knn_top1": 0.2, "probe_top1": 0.9, "metric_source": "knn_top1"}),
        _trial("c", "RUNNING", {"epoch": 2}),
    ]
    line = view.status_line(trials, now=161.0)
    # epochs: 4 + 1 + 2 trained; planned: the ended trials' 4 + 1, the running one's 4, one more trial's 4
    assert line.startswith("[1:01] 2/4 done: 1 finished, 1 stopped early | 1 running | epochs 7/13")
    assert "best probe_top1 0.3100" in line  # a stopped trial's stand-in (0.9) is no score
    # c: 2 epochs left + probe = 5 s; one trial not started: 4 * 2 + 1 = 9 s; two slots share
    # 14 s of work (7 s), but the trial not started alone takes 9 s
    assert line.endswith("ETA 0:09")
    failed = _trial("d", "TERMINATED", {"final": True, "status": "failed", "error": "ValueError: boom"}, **{
        "method.K": 4})
    assert progress.trial_state(failed) == "failed"
    assert "ValueError: boom" in view.trial_line(failed)
    assert "stopped early" in view.trial_line(trials[1]) and "after epoch 1" in view.trial_line(trials[1])


def test_sampled_text_is_short_and_readable() -> None:
    text = progress.sampled_text({"method.K": 4, "method.aggregation": "cat", "train.lr": 0.000812345,
                                  "probe.lr": 0.01, "epochs": 3})
    assert text == "K=4 aggregation=cat train.lr=0.00081 probe.lr=0.01"


# ----------------------------------------------------------------------------- follow-up commands


def test_printed_commands_round_trip_every_value_through_the_shell() -> None:
    best = {"method.K": 4, "method.aggregation": "cat", "train.lr": 1e-05, "train.momentum": 0.000812345678901,
            "data.name": "two words", "train.amp": False}
    lines = progress.next_steps(experiment="my exp", sweep="s 1", tracking_uri="sqlite:////tmp/a b/mlflow.db",
                                ui_url="http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning",
                                experiment_file=Path("/tmp/a b/experiment.yaml"), best=best,
                                resume="rrscale tune --resume '/tmp/a b'")
    alone = next(ln for ln in lines if "run the best alone" in ln).split(":", 1)[1].strip()
    argv = shlex.split(alone)
    assert argv[:3] == ["rrscale", "train", "/tmp/a b/experiment.yaml"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert dict(parse_override(s) for s in sets) == best  # same values, same types
    runs = next(ln for ln in lines if "compare the trials" in ln).split(":", 1)[1].strip()
    assert shlex.split(runs) == ["rrscale", "runs", "my exp", "--sweep", "s 1", "--tracking-uri",
                                 "sqlite:////tmp/a b/mlflow.db"]
    ui = next(ln for ln in lines if "MLflow UI" in ln)
    assert "mlflow ui --backend-store-uri 'sqlite:////tmp/a b/mlflow.db'" in ui and "#/experiments/3/runs" in ui
    assert not any("continue" in ln or "MLflow" in ln for ln in progress.next_steps(
        experiment="e", sweep="s", tracking_uri="", ui_url="", experiment_file="x", best=None, resume=""))


def test_resolved_experiment_file_reloads_to_the_same_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rrscale.scale.tune import resolved_experiment

    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RRSCALE_DATA_ROOT", "data")  # relative, as users write it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = sweep_yaml(tmp_path, "resolved")
    sets = ["train.epochs=3", "method.head_width=24"]
    cfg = resolved_experiment(load_config(path, sets), path)
    folder = tmp_path / "ray_results" / "resolved"
    written = sweep_dir.write_experiment(cfg, folder, source=path, overrides=sets)
    assert written == sweep_dir.resume_target(folder)
    monkeypatch.delenv("RRSCALE_DATA_ROOT")
    monkeypatch.chdir("/")
    again = load_config(written)  # a new shell: no variable, another folder, no --set
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert again.data.root == str(data) and again.train.epochs == 3
    assert again.tune.name == "resolved" and again.tune.storage_path == str(folder.parent)
    assert again.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "rrscale tune --resume" in written.read_text().splitlines()[2]


# ----------------------------------------------------------------------------- sweep folder


def test_a_sweep_on_a_storage_uri_keeps_its_local_folder_whatever_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rrscale.scale.tune import sweep_exists, sweep_paths

    cfg = load_config(sweep_yaml(tmp_path, "uri", tune={"storage_path": f"file://{tmp_path}/bucket"}))
    monkeypatch.chdir(tmp_path)
    here = sweep_paths(cfg, Path("uri.yaml"))
    monkeypatch.chdir("/")
    assert sweep_paths(cfg, Path("uri.yaml")) == here
    assert here[2].parent == Path.home() / ".rrscale" / "sweeps" and here[2].name.startswith("uri-")
    assert not sweep_exists(here[1], "uri")
    (tmp_path / "bucket" / "uri").mkdir(parents=True)
    (tmp_path / "bucket" / "uri" / "tuner.pkl").write_bytes(b"")
    assert sweep_exists(here[1], "uri") and sweep_exists(str(tmp_path / "bucket"), "uri")


def test_sweep_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with sweep_dir.SweepLock(tmp_path / "s"):
        with pytest.raises(sweep_dir.SweepBusy, match=f"pid {os.getpid()}"):
            sweep_dir.SweepLock(tmp_path / "s").__enter__()
    with sweep_dir.SweepLock(tmp_path / "s"):  # free again once the first let go
        pass


def test_check_storage_refuses_a_file_and_an_unwritable_folder_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^f.yaml: tune.storage_path: '.*file' is a file; expected a folder to write into$"):
        sweep_dir.check_storage(str(tmp_path / "file"), "f.yaml")
    with pytest.raises(ConfigError, match="is a file"):
        sweep_dir.check_storage(str(tmp_path / "file" / "below"), "f.yaml")
    sweep_dir.check_storage(str(tmp_path / "new" / "deeper"), "f.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (an immutable folder is how root gets a read-only one)")
    try:
        with pytest.raises(ConfigError, match="expected a writable folder"):
            sweep_dir.check_storage(str(locked / "sweeps"), "f.yaml")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


@pytest.mark.timeout(120, method="thread")
def test_storage_path_that_is_a_file_is_one_line_exit_2_before_ray(ray_env: RayEnv,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    (ray_env.tmp / "taken").write_text("not a folder")
    path = sweep_yaml(ray_env.tmp, "s", tune={"storage_path": str(ray_env.tmp / "taken")})
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tune.storage_path: '" in err and "expected a folder to write into" in err, err
    assert not ray.is_initialized() and ray_env.session_dirs() == []
    assert main(["tune", str(ray_env.tmp), "--resume"]) == 2  # a folder that is no sweep
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected a sweep folder holding experiment.yaml" in err, err


# ----------------------------------------------------------------------------- trial records


def test_trial_records_say_how_a_trial_ended(tmp_path: Path) -> None:
    trial = str(tmp_path / "t1")
    assert trial_record.ending_of(trial) is None
    ckpt = tmp_path / "t1" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"")
    assert trial_record.ending_of(trial) is None  # a plain epoch checkpoint: not ended
    (tmp_path / "t1" / "checkpoint_000003").mkdir()
    trial_record.write_json(str(tmp_path / "t1" / "checkpoint_000003" / "final.json"), {"final": True, "x": 1})
    assert trial_record.ending_of(trial) == ("finished", {"final": True, "x": 1})
    result = {"epoch": 2, "knn_top1": 0.2, "loss": float("nan"), "time_total_s": 3.0, "config/method.K": 4,
              "config": {"method.K": 4}, "hist": [1], "final": False}
    trial_record.record_ending(trial, result, error=False)  # the driver's record wins
    assert trial_record.ending_of(trial) == ("stopped early", {"epoch": 2, "knn_top1": 0.2, "loss": None,
                                                               "final": False})
    assert trial_record.outcome({"final": True, "status": "failed"}, False) == "failed"
    assert trial_record.outcome(None, True) == "failed"
    assert trial_record.outcome({"final": True}, False) == "finished"


def test_only_failures_that_another_attempt_can_fix_are_retried() -> None:
    import ray.exceptions

    from rrscale.data.sources import DataError
    from rrscale.methods import TrainingDiverged

    for exc in (ray.exceptions.RayActorError(), ConnectionResetError("peer"), OSError(5, "I/O error"), MemoryError(),
                torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("NCCL error: unhandled system error")):
        assert retryable(exc), exc
    for exc in (TrainingDiverged("loss 1e12"), ConfigError("x: y: expected z"), DataError("labels"),
                ValueError("shapes"), KeyError("k"), FileNotFoundError("gone"), RuntimeError("size mismatch")):
        assert not retryable(exc), exc


# ----------------------------------------------------------------------------- trials/hour


def _result(tid: str, metrics: dict[str, Any], error: Any = None) -> Any:
    return SimpleNamespace(metrics={"trial_id": tid, **metrics}, config={"method.K": 2}, path=f"/x/{tid}",
                           error=error, metrics_dataframe=None)


def test_trials_per_hour_counts_what_ended_here_and_is_absent_otherwise(tmp_path: Path) -> None:
    from rrscale.scale.tune import summarize

    cfg = load_config(sweep_yaml(tmp_path, "rate"))
    facts = {"max_concurrent": 2, "mode": "inprocess", "base": {}, "local": tmp_path, "experiment": str(tmp_path)}
    for tid in ("a", "b", "c"):
        trial_record.record_ending(str(tmp_path / tid), {"epoch": 1}, error=False)
    now = time.time()
    done = {"final": True, "status": "ok", "probe_top1": 0.3, "metric_source": "probe_top1", "epochs": 2}
    earlier = [_result("a", {**done, "timestamp": now - 3600}), _result("b", {**done, "timestamp": now, "replayed": True}),
               _result("c", {"epoch": 1, "timestamp": now - 3600})]
    summary = summarize(earlier, cfg, facts, wall=2.0, since=now - 10)
    assert "trials_per_hour" not in summary  # a resumed, finished sweep: nothing ended here
    assert summary["finished"] == 2 and summary["stopped_early"] == 1
    here = earlier + [_result("d", {**done, "timestamp": now}), _result("e", {"epoch": 1, "timestamp": now})]
    trial_record.record_ending(str(tmp_path / "e"), {"epoch": 1}, error=False)
    summary = summarize(here, cfg, facts, wall=1800.0, since=now - 10)
    assert summary["trials_per_hour"] == pytest.approx(4.0)  # d finished, e stopped early, in half an hour
    cut = summarize([_result("f", {"epoch": 1, "timestamp": now})], cfg, facts, wall=10.0, since=now - 10)
    assert cut["interrupted"] == 1 and cut["interrupted_sweep"] and "trials_per_hour" not in cut


# ----------------------------------------------------------------------------- Ray dashboard port, MLflow


def test_a_taken_dashboard_port_gives_another_free_one() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        other = pick_dashboard_port(taken)
        assert other != taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", other))  # it really is free
    assert pick_dashboard_port(other) == other


@pytest.mark.timeout(120, method="thread")
def test_a_refused_tracking_server_is_detected_in_seconds_and_said_once(caplog: pytest.LogCaptureFixture,
                                                                        tmp_path: Path) -> None:
    from rrscale.tracking import mlflow as trk

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused
    caplog.set_level(logging.WARNING)
    tic = time.monotonic()
    parent = trk.start_sweep("e", uri, "s", tmp_path / "none.yaml", {"a": 1}, resume=False)
    run = trk.start_trial(parent, "t", {}, {}, tracking_uri=uri)
    trk.log_epoch(run, {"loss": 1.0}, 1, tracking_uri=uri)
    trk.end_trial(run, {"probe_top1": 0.5}, "FINISHED", None, tracking_uri=uri)
    trk.finish_sweep(parent, {}, {}, [], tracking_uri=uri)
    took = time.monotonic() - tic
    trk.forget_failures()
    assert parent == "" and run == ""
    assert took < trk.REACH_TIMEOUT_S + 2
    said = [r.getMessage() for r in caplog.records if uri in r.getMessage()]
    assert len(said) == 1 and "unreachable" in said[0] and "Connection refused" in said[0], said


# ----------------------------------------------------------------------------- reconciling after a kill


def test_a_restored_searcher_catches_up_with_the_newer_optuna_study(tmp_path: Path) -> None:
    """What a SIGKILL leaves: the pickled searcher (Tune's snapshot) knows trials t1, t2 as
    running, while the study (written later) has t1 COMPLETE and a 3rd trial asked for after the
    snapshot. Restored, the searcher neither re-tells t1 (Optuna would raise) nor leaves the 3rd
    RUNNING forever: the next new Tune trial takes it over with the same sampled values."""
    import optuna

    from rrscale.scale import space
    from rrscale.scale.tune import RRSearch, close_lost_optuna_trials

    cfg = load_config(sweep_yaml(tmp_path, "s"))
    base = space.base_dict(cfg)
    db = tmp_path / "optuna.db"

    def searcher() -> RRSearch:
        return RRSearch(space=space.define_by_run(cfg.search, base), metric="probe_top1", mode="max",
                        sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                        storage=optuna.storages.RDBStorage(f"sqlite:///{db}"), trial_root=str(tmp_path / "trials"))

    first = searcher()
    first.suggest("t1")
    first.suggest("t2")
    first.save(str(tmp_path / "snapshot.pkl"))
    first.on_trial_complete("t1", {"probe_top1": 0.4, "final": True, "metric_source": "probe_top1"})
    lost = first.suggest("t3")  # asked for after the snapshot
    assert trial_record.ending_of(str(tmp_path / "trials" / "t1"))[0] == "finished"  # recorded before Optuna

    restored = searcher()
    restored.restore(str(tmp_path / "snapshot.pkl"))
    restored.on_trial_result("t1", {"probe_top1": 0.4, "training_iteration": 4})  # re-reported: no error
    restored.on_trial_complete("t1", {"probe_top1": 0.4, "final": True, "metric_source": "probe_top1"})
    assert restored.suggest("t9") == lost  # the orphan, taken over
    restored.on_trial_complete("t9", {"probe_top1": 0.3, "final": True, "metric_source": "probe_top1"})
    restored.on_trial_complete("t2", {"status": "failed", "final": True, "probe_top1": 0.2, "metric_source": "none"})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 0.4), ("FAIL", None), ("COMPLETE", 0.3)]
    assert close_lost_optuna_trials(db, "s") == 0
    study.ask()  # one nobody took over: failed, with the reason, once the sweep ends
    assert close_lost_optuna_trials(db, "s") == 1
    assert "lost" in optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials[-1].user_attrs["rrscale.status"]


@pytest.mark.timeout(120, method="thread")
def test_stray_trial_runs_are_closed_and_interrupted_ones_say_so(tmp_path: Path) -> None:
    import mlflow
    from mlflow.entities import ViewType

    from rrscale.tracking import mlflow as trk

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = trk.start_sweep("e", uri, "s", tmp_path / "none.yaml", {"a": 1}, resume=False)
    runs = {t: trk.start_trial(parent, t, {}, {}, tracking_uri=uri) for t in ("t1", "t2", "t3")}
    trk.end_trial(runs["t1"], {"probe_top1": 0.5}, "FINISHED", None, tracking_uri=uri)
    assert trk.close_stray_trials(parent, {"t1", "t2"}, tracking_uri=uri) == ["t3"]
    trk.end_trial(runs["t2"], {}, "interrupted", None, tracking_uri=uri)
    trk.finish_sweep(parent, {}, {}, [], status="interrupted", tracking_uri=uri)
    client = mlflow.tracking.MlflowClient(uri)
    active = {r.data.tags["rrscale.trial_id"]: r for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")}
    assert sorted(active) == ["t1", "t2"]
    assert active["t2"].info.status == "KILLED" and active["t2"].data.tags["rrscale.status"] == "interrupted"
    stray = client.get_run(runs["t3"])
    assert stray.info.lifecycle_stage == "deleted" and stray.data.tags["rrscale.status"] == "lost"
    assert client.get_run(parent).data.tags["rrscale.status"] == "interrupted"
    assert len(client.search_runs([stray.info.experiment_id], run_view_type=ViewType.ALL)) == 4
