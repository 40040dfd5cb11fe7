"""``rrscale``: train, probe and tune relational reasoning / GEDI from one YAML file.

Every command validates all of its input before it starts anything: a bad file, key, value or
data location prints one line (file, dotted path, what was expected) and exits with code 2,
with nothing written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_INTERRUPTED = 130  # what a shell reports for SIGINT

EXAMPLES_TRAIN = """\
examples:
  rrscale train                                   # paper defaults: RR, conv4, CIFAR-10, K=32, 200 epochs
  rrscale train exp.yaml --set method.K=4 --set train.epochs=10
  rrscale train --set data.root=../shared/data/cifar10-mini --set train.epochs=2 --out runs/smoke
  RRSCALE_DATA_ROOT=/data/cifar10 rrscale train exp.yaml --workers 2   # Ray Train, 2 DDP workers

Data: data.root, else $RRSCALE_DATA_ROOT, else ~/.cache/rrscale/data (torchvision download).
A folder of Parquet shards (train*.parquet, test*.parquet) or a .npz from 'rrscale data convert'
works for every image dataset name.
The run directory holds summary.json, metrics.jsonl and checkpoint.pt; running the same
config into the same --out resumes from the last checkpoint (use --fresh to start over).
"""

EXAMPLES_TUNE = """\
examples:
  rrscale tune search_spaces/quickstart.yaml      # a few trials, minutes on a laptop CPU
  rrscale tune search_spaces/cifar.yaml --set tune.num_samples=32
  rrscale tune --resume runs/tune/cifar           # continue an interrupted sweep (its folder)
  rrscale tune search_spaces/cifar.yaml --resume  # the same, from the file (with the same --set)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rrscale",
        description="Tune and scale relational reasoning (RR) and GEDI self-supervised learning.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rrscale COMMAND --help' for each command's options and examples.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted path, e.g. --set method.K=8 (repeatable)")

    t = sub.add_parser("train", help="train one experiment, then linear-probe it",
                       description="Train the method of FILE (defaults when omitted), then run the linear "
                       "probe and kNN; writes OUT/summary.json and OUT/checkpoint.pt.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("file", nargs="?", help="experiment YAML (search:/tune: sections are ignored)")
    with_overrides(t)
    t.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<dataset>-<config hash>)")
    t.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers (DDP); 0 runs in this process (default: scaling.num_workers)")
    t.add_argument("--fresh", action="store_true", help="ignore a checkpoint already in --out")

    pr = sub.add_parser("probe", help="linear-probe a checkpoint (optionally on another dataset)",
                        description="Rebuild the backbone of CHECKPOINT and run the linear probe and kNN. "
                        "--set data.probe_name=cifar100 probes on another dataset (cross-domain).",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  rrscale probe runs/smoke/checkpoint.pt --set probe.epochs=10")
    pr.add_argument("checkpoint", type=Path)
    with_overrides(pr)
    pr.add_argument("--out", type=Path, help="where to write probe.json (default: next to the checkpoint)")

    tu = sub.add_parser("tune", help="search hyperparameters with Ray Tune + Optuna, tracked in MLflow",
                        description="Run the sweep described by FILE's search: and tune: sections.",
                        epilog=EXAMPLES_TUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    tu.add_argument("file", help="experiment YAML, or with --resume the sweep's folder")
    with_overrides(tu)
    tu.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name "
                    "(FILE may then be the sweep folder: it keeps the resolved experiment)")

    ru = sub.add_parser("runs", help="list the sweeps of an experiment, rank the trials of one; plots, HTML report",
                        description="List every sweep of EXPERIMENT (name, start, trials, best) and rank the "
                        "trials of the latest one, or of --sweep NAME, from MLflow.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  rrscale runs\n  rrscale runs quickstart --sweep quickstart-lr\n"
                        "  rrscale runs quickstart --plots plots/ --report sweep.html")
    ru.add_argument("experiment", nargs="?", help="MLflow experiment name (default: the most recent)")
    ru.add_argument("--sweep", default="", help="sweep name or parent run id (default: the latest; "
                    "'all': every sweep's trials together)")
    ru.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                    "or sqlite:///mlflow.db)")
    ru.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    ru.add_argument("--report", type=Path, help="write a one-page HTML sweep report")
    ru.add_argument("--top", type=int, default=20, help="rows to show (default 20)")

    da = sub.add_parser("data", help="dataset tools")
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION")
    cv = dsub.add_parser("convert", help="write Parquet shards (PNG bytes + label) or one .npz from any image source",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="examples:\n  rrscale data convert cifar10:~/data/cifar out/cifar10\n"
                         "  rrscale data convert imagefolder:~/pets out/pets --shard-size 5000\n"
                         "  rrscale data convert cifar10:../shared/data/cifar10 cifar10.npz   # numpy only, "
                         "no pyarrow to read\n"
                         "  rrscale data convert cifar10:../shared/data/cifar10 c10-40.npz --fraction 0.4\n\n"
                         "A .npz holds x_train, y_train, x_test, y_test (uint8 NHWC images, int64 labels) and name;\n"
                         "use it as data.root, or hand it to benchmarks/gpu_suite.py --data.")
    cv.add_argument("src", help="NAME[:ROOT], NAME one of the data.name values (e.g. svhn:~/data)")
    cv.add_argument("dst", type=Path, help="output folder (Parquet shards) or FILE.npz (one compressed numpy file)")
    cv.add_argument("--shard-size", type=int, default=10000)
    cv.add_argument("--fraction", type=float, default=1.0,
                    help="keep this stratified share of the training images, seed 0 (test stays whole): "
                    "a small copy to carry")

    sub.add_parser("doctor", help="versions, devices and data locations found")
    return p


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"rrscale: error: {message}", file=sys.stderr)
    return code


def _default_out(cfg: Any) -> Path:
    return Path("runs") / f"{cfg.method.name}-{cfg.data.name}-{cfg.config_hash()}"


def cmd_train(args: argparse.Namespace) -> int:
    from rrscale.config import ConfigError, load_config

    try:
        cfg = load_config(args.file, args.overrides)
        workers = cfg.scaling.num_workers if args.workers is None else args.workers
        if workers < 0:
            raise ConfigError(f"--workers: expected an integer >= 0 (got {workers})")
    except ConfigError as exc:
        return _fail(str(exc))
    from rrscale.data.sources import DataError, load_data
    from rrscale.engine.checkpoint import CheckpointError
    from rrscale.engine.rundir import RunDirError, check_writable, locked, write_json

    out = args.out or _default_out(cfg)
    try:
        check_writable(out, "--out")
        data = load_data(cfg.data, seed=cfg.train.seed)  # on the driver: fails before anything starts
    except RunDirError as exc:
        return _fail(str(exc))
    except DataError as exc:
        return _fail(f"{args.file or '(defaults)'}: {exc}")
    with ExitStack() as held:
        try:
            held.enter_context(locked(out))
            resumed = _prepare_run_dir(out, cfg, data, fresh=args.fresh)
        except RunDirError as exc:
            return _fail(str(exc))
        except CheckpointError as exc:
            return _fail(f"{out / 'checkpoint.pt'}: {exc}; use --fresh or another --out")
        try:
            if workers > 0:
                from rrscale.scale.train import train_with_ray

                summary = train_with_ray(cfg, out_dir=out.resolve(), num_workers=workers)
            else:
                summary = _train_local(cfg, data, out)
        except KeyboardInterrupt:
            return _fail(f"interrupted; {out} keeps its last checkpoint: continue with "
                         f"{_resume_command(args, out)}", EXIT_INTERRUPTED)
        if resumed is not None:
            summary["resumed"] = resumed
        write_json(out / "summary.json", summary)
    if summary.get("status") != "ok":
        return _fail(f"training failed: {summary.get('error', 'unknown error')} (see {out}/summary.json)",
                     EXIT_TRAINING_FAILED)
    _print_summary(summary, out / "summary.json")
    return 0


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The train command that continues into ``out``, as pasted in a new shell."""
    import os

    env = os.environ.get("RRSCALE_DATA_ROOT")
    words = [f"RRSCALE_DATA_ROOT={env}"] if env else []
    words += ["rrscale", "train"]
    if args.file:
        words.append(str(Path(args.file).resolve()))
    for override in args.overrides:
        words += ["--set", override]
    if args.workers is not None:
        words += ["--workers", str(args.workers)]
    words += ["--out", str(out.resolve())]
    return shlex.join(words)


def _prepare_run_dir(out: Path, cfg: Any, data: Any, *, fresh: bool) -> dict[str, Any] | None:
    """Under the run's lock: start over (``--fresh``) or check that OUT's checkpoint can continue
    under ``cfg``; leave OUT consistent with that epoch. Returns what the resume keeps and changes.

    Values that differ from the checkpoint's config (lr, epochs, ...) apply from the resumed
    epoch on; they are printed and recorded as ``resumed`` in summary.json.
    """
    import torch

    from rrscale.engine.checkpoint import CheckpointError, check_compatible, config_changes, load_checkpoint
    from rrscale.engine.loop import sample_shape
    from rrscale.engine.rundir import prepare_resume
    from rrscale.methods import build_method

    path = out / "checkpoint.pt"
    if fresh:
        for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
    if not path.exists():
        prepare_resume(out, 0)
        return None
    state = load_checkpoint(path)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_method(cfg, *sample_shape(data.train))
    check_compatible(state, cfg, model, with_optimizer=True)
    epoch = int(state["epoch"])
    if epoch > cfg.train.epochs:
        raise CheckpointError(f"is at epoch {epoch}, beyond train.epochs={cfg.train.epochs}")
    prepare_resume(out, epoch)
    changes = {k: [old, new] for k, (old, new) in config_changes(state["config"], cfg).items()}
    shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in list(changes.items())[:6])
    more = f" and {len(changes) - 6} more (see summary.json)" if len(changes) > 6 else ""
    print(f"resuming {path} at epoch {epoch}" + (f"; from this config: {shown}{more}" if changes else ""),
          file=sys.stderr)
    return {"from_epoch": epoch, "changed": changes}


def _train_local(cfg: Any, data: Any, out: Path) -> dict[str, Any]:
    from rrscale.engine.loop import LocalHooks, run_experiment
    from rrscale.engine.rundir import write_json
    from rrscale.methods import TrainingDiverged

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.model_dump(mode="json"))
    try:
        return run_experiment(cfg, hooks=LocalHooks(out), out_dir=out, data=data)
    except TrainingDiverged as exc:
        return {"status": "failed", "error": str(exc), "config_hash": cfg.config_hash()}


def _print_summary(summary: dict[str, Any], written: Path) -> None:
    keys = ("probe_top1", "knn_top1", "nmi", "acc", "images_per_s", "epochs", "seconds", "device")
    parts = []
    for k in keys:
        if k in summary:
            v = summary[k]
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    print("  ".join(parts))
    if summary.get("collapsed"):
        print(f"WARNING: cluster collapse: the model assigns everything to one cluster "
              f"(clusters_used={summary.get('clusters_used', 0):.0f} on the test set)")
    print(f"wrote {written}")


def cmd_probe(args: argparse.Namespace) -> int:
    import copy

    import torch

    from rrscale.config import ConfigError, parse_override, set_dotted, validate
    from rrscale.data.sources import DataError, load_data
    from rrscale.engine.checkpoint import CheckpointError, check_compatible, load_checkpoint
    from rrscale.engine.loop import sample_shape
    from rrscale.engine.rundir import RunDirError, check_writable, write_json
    from rrscale.methods import build_method

    expected = "expected a checkpoint.pt written by 'rrscale train'"
    if not args.checkpoint.is_file():
        return _fail(f"{args.checkpoint}: (file): {expected}")
    out = args.out or args.checkpoint.parent
    try:
        check_writable(out, "--out")
        state = load_checkpoint(args.checkpoint)
    except RunDirError as exc:
        return _fail(str(exc))
    except CheckpointError as exc:
        return _fail(f"{args.checkpoint}: (file): {expected} ({exc})")
    raw = copy.deepcopy(state["config"])
    source = f"{args.checkpoint} with --set" if args.overrides else str(args.checkpoint)
    try:
        for text in args.overrides:
            key, value = parse_override(text)
            set_dotted(raw, key, value)
        cfg = validate(raw, source)
        data = load_data(cfg.data, seed=cfg.train.seed)
        with torch.device("meta"):
            check_compatible(state, cfg, build_method(cfg, *sample_shape(data.train)), with_optimizer=False)
    except ConfigError as exc:
        return _fail(str(exc))
    except DataError as exc:
        return _fail(f"{args.checkpoint}: {exc}")
    except CheckpointError as exc:
        return _fail(f"{source}: the checkpoint {exc}; the probe rebuilds the checkpoint's backbone and "
                     f"method, so --set may not change their shapes")
    summary = probe_checkpoint(cfg, state, data)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", summary)
    _print_summary(summary, out / "probe.json")
    return 0


def probe_checkpoint(cfg: Any, state: dict[str, Any], data: Any) -> dict[str, Any]:
    """Rebuild the method of a checkpoint and score it; the backbone must match the data's shape."""
    from rrscale.engine.loop import describe_device, final_evaluation, pick_device, sample_shape
    from rrscale.methods import build_method

    device = pick_device(cfg.train.device)
    method = build_method(cfg, *sample_shape(data.train))
    method.load_state_dict(state["model"])
    method.to(device)
    summary = {"epochs": int(state.get("epoch", 0)), "config_hash": cfg.config_hash(),
               "device": describe_device(device), "probe_dataset": cfg.data.probe_name or cfg.data.name}
    summary.update(final_evaluation(cfg, method, data, device, None))
    return summary


def cmd_tune(args: argparse.Namespace) -> int:
    from rrscale.config import ConfigError, load_config
    from rrscale.data.sources import DataError, load_data

    path = Path(args.file)
    if args.resume and path.is_dir():
        from rrscale.scale.sweep_dir import EXPERIMENT_FILE, resume_target

        path = resume_target(path)
        if not path.is_file():
            return _fail(f"{args.file}: (folder): expected a sweep folder holding {EXPERIMENT_FILE} "
                         "(rrscale tune writes it when a sweep starts)")
    try:
        cfg = load_config(path, args.overrides)
        from rrscale.scale.tune import check_tune_config, run_tune

        check_tune_config(cfg, path)
        load_data(cfg.data, seed=cfg.train.seed)  # fails before Ray starts; warms the decode cache
    except ConfigError as exc:
        return _fail(str(exc))
    except DataError as exc:
        return _fail(f"{path}: {exc}")
    return run_tune(cfg, path, resume=args.resume, overrides=args.overrides)


def cmd_runs(args: argparse.Namespace) -> int:
    from rrscale.tracking.runs import main as runs_main

    return runs_main(args.experiment, tracking_uri=args.tracking_uri, plots=args.plots, report=args.report,
                     top=args.top, sweep=args.sweep)


def cmd_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.data_command != "convert":
        parser.parse_args(["data", "--help"])
        return EXIT_BAD_INPUT
    from rrscale.config import ConfigError, validate
    from rrscale.data.parquet import convert
    from rrscale.data.sources import DataError

    name, _, root = args.src.partition(":")
    try:
        if args.shard_size < 1:
            raise ConfigError(f"--shard-size: expected an integer >= 1 (got {args.shard_size})")
        if not 0.0 < args.fraction <= 1.0:
            raise ConfigError(f"--fraction: expected a number in (0, 1] (got {args.fraction:g})")
        if args.dst.suffix.lower() == ".npy":
            raise ConfigError(f"DST '{args.dst}': expected a folder or a .npz file (a .npy holds no labels)")
        cfg = validate({"data": {"name": name, "root": root, "fraction": args.fraction}}, f"SRC '{args.src}'").data
        written = convert(cfg, args.dst, shard_size=args.shard_size)
    except ConfigError as exc:
        return _fail(str(exc))
    except DataError as exc:
        return _fail(f"SRC '{args.src}': {exc}")
    for path in written:
        print(path)
    return 0


def cmd_doctor() -> int:
    import importlib.metadata as md
    import os
    import platform

    from rrscale.config import DATA_ROOT_ENV

    print(f"python      {platform.python_version()} ({sys.executable})")
    for pkg in ("rrscale", "torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "pydantic"):
        try:
            print(f"{pkg:<11} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"{pkg:<11} NOT INSTALLED")
    import torch

    print(f"cpu         {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}      {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda        not available (training runs on the CPU)")
    root = os.environ.get(DATA_ROOT_ENV, "")
    print(f"data        ${DATA_ROOT_ENV}={root or '(unset)'}")
    candidates = [Path(root)] if root else []
    candidates += [Path.home() / ".cache" / "rrscale" / "data", Path("../shared/data/cifar10"),
                   Path("../shared/data/cifar10-mini")]
    for c in candidates:
        shards = sorted(c.glob("*.parquet")) if c.is_dir() else []
        state = f"{len(shards)} Parquet files" if shards else ("exists" if c.exists() else "missing")
        print(f"            {c}: {state}")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'} (default)"
    print(f"mlflow      {uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if args.command == "train":
        return cmd_train(args)
    if args.command == "probe":
        return cmd_probe(args)
    if args.command == "tune":
        return cmd_tune(args)
    if args.command == "runs":
        return cmd_runs(args)
    if args.command == "data":
        return cmd_data(args, parser)
    return cmd_doctor()


if __name__ == "__main__":
    sys.exit(main())
