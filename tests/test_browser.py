"""The comparison a user opens after a sweep, checked in a real browser: MLflow's runs page and
chart view, and the sweep's HTML report.

One small real sweep (Ray Tune + Optuna + ASHA, tracked through a real ``mlflow server`` on
127.0.0.1) serves every test here. The browser is Debian's Chromium (``/usr/bin/chromium``,
installed by ``.ci/run``) driven by Playwright with a fresh profile; screenshots go to the
test's temp folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.scale_fixtures import REPO, end_processes, free_port, sweep_yaml
from tests.tracking_fixtures import start_mlflow_server, stop_mlflow_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: MLflow 3.17 opens an assistant side panel on first load; a user closes it once, so do we.
NO_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
EXPANDER = "button[data-component-id$='runnamecellrenderer.tsx_46']"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(480, method="thread"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium; .ci/run installs it)"),
]


def _sweep_env(ray_tmp: Path, token: str, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({"RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": token, "RRSCALE_DASHBOARD_PORT": str(free_port()), "MLFLOW_TRACKING_URI": uri,
                "MLFLOW_DISABLE_TELEMETRY": "true", "RRSCALE_TUNE_VERBOSE": "0", "OMP_NUM_THREADS": "1",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 4-trial sweep (K x aggregation x lr, ASHA) in a sqlite store, then ``mlflow server`` on it.

    The sweep writes to sqlite as ``rrscale tune`` does by default (logging through HTTP is
    tests/test_tracking_server.py's subject); the server then serves that store to the browser.
    """
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("browser")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    token = secrets.token_hex(16)
    store = f"sqlite:///{root / 'mlflow.db'}"
    proc = None
    try:
        # lr 3.0 wrecks the features within an epoch: ASHA stops such trials at its first rung
        path = sweep_yaml(root, "browse", train={"epochs": 2},
                          search={"method.K": {"choice": [2, 3]}, "method.aggregation": {"choice": ["cat", "sum"]},
                                  "train.lr": {"choice": [1e-3, 3.0]}},
                          tune={"num_samples": 4, "seed": 2})
        tic = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "rrscale.cli", "tune", str(path)], cwd=root,
                              env=_sweep_env(ray_tmp, token, store), capture_output=True, text=True, timeout=360)
        assert done.returncode == 0, done.stderr[-3000:]
        swept_s = time.monotonic() - tic
        proc, uri = start_mlflow_server(root / "server", backend=store)
        print(f"sweep: {swept_s:.1f} s; server start: {time.monotonic() - tic - swept_s:.1f} s")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("rrscale-tests")
        runs = client.search_runs([exp.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("rrscale.role") == "sweep")
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        yield {"uri": uri, "store": store, "exp": exp.experiment_id, "parent": parent, "trials": trials,
               "client": client}
    finally:
        if proc is not None:
            stop_mlflow_server(proc)
        end_processes(str(ray_tmp), f"RAY_AUTH_TOKEN={token}")
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                    args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 900})
        ctx.add_init_script(NO_ASSISTANT)
        ctx.set_default_timeout(60_000)
        try:
            yield ctx
        finally:
            ctx.close()


def _cells(page: Any) -> dict[str, dict[str, str]]:
    """The runs table as {run name: {column id: text}} (ag-grid renders one row per run)."""
    return page.evaluate("""() => {
        const rows = {};  // pinned and scrolled columns live in separate row elements: join by row-index
        for (const row of document.querySelectorAll('[role=row][row-index]')) {
            const cells = rows[row.getAttribute('row-index')] ||= {};
            for (const c of row.querySelectorAll('[role=gridcell][col-id]')) {
                const lines = c.innerText.trim().split('\\n');  // a run's colour swatch text comes before its name
                cells[c.getAttribute('col-id')] = lines[lines.length - 1].trim();
            }
        }
        const out = {};
        for (const cells of Object.values(rows)) if (cells['attributes.`Run Name`']) out[cells['attributes.`Run Name`']] = cells;
        return out;
    }""")


def test_mlflow_runs_page_shows_readable_trials_objective_first(swept: dict[str, Any], browser: Any,
                                                                tmp_path: Path) -> None:
    from rrscale.tracking import links

    parent, trials = swept["parent"], swept["trials"]
    url = links.comparison_url(parent.info.run_id, swept["uri"])
    assert url == (f"{swept['uri']}/#/experiments/{swept['exp']}/runs?workflowType=machine_learning"
                   "&viewStateShareKey=rrscale-browse")
    page = browser.new_page()
    page.goto(url)
    page.get_by_text("browse", exact=True).first.wait_for()
    page.locator(EXPANDER).first.click()  # the sweep's row opens onto its trials
    for t in trials:
        page.get_by_text(t.info.run_name, exact=True).first.wait_for()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(tmp_path / "mlflow-runs.png"))
    cells = _cells(page)
    headers = [col for _, col in sorted(page.locator("[role=columnheader][col-id][aria-colindex]").evaluate_all(
        "els => els.map(e => [Number(e.getAttribute('aria-colindex')), e.getAttribute('col-id')])"))]
    assert headers.index("metrics.`probe_top1`") < headers.index("metrics.`knn_top1`") < headers.index(
        "params.`method.K`")
    assert headers.index("metrics.`probe_top1`") == min(i for i, h in enumerate(headers) if h.startswith("metrics."))
    outcomes = set()
    for t in trials:
        name = t.info.run_name
        trial_id = t.data.tags["rrscale.trial_id"]
        assert name.endswith(f" · {trial_id}") and name.startswith("K"), name
        row = cells[name]
        outcome = t.data.tags["rrscale.status"]
        outcomes.add(outcome)
        assert row["tags.`rrscale.status`"] == outcome
        if outcome == "finished":
            shown = row["metrics.`probe_top1`"]
            assert float(shown) == pytest.approx(t.data.metrics["probe_top1"], abs=5e-4)
            assert len(shown) <= 6, shown  # 0.295, not 0.29499998
        else:
            assert outcome == "stopped early" and row["metrics.`probe_top1`"] == "-"
    assert "finished" in outcomes
    assert "Killed" not in page.inner_text("body")
    if "stopped early" not in outcomes:
        pytest.skip("ASHA stopped no trial in this run (timing); the rest of the page was checked")


def test_mlflow_chart_view_starts_with_the_objective(swept: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    from rrscale.tracking import links

    page = browser.new_page()
    page.goto(links.comparison_url(swept["parent"].info.run_id, swept["uri"]) + "&compareRunsMode=CHART")
    page.get_by_text("browse", exact=True).first.wait_for()
    page.locator(EXPANDER).first.click()
    objective = page.get_by_text("probe_top1: the sweep's objective")
    objective.wait_for()
    axes = page.get_by_text("Parallel Coordinates").first
    axes.wait_for()
    page.get_by_text("method.K").first.wait_for()  # the parallel coordinates drew the sampled axes
    page.wait_for_timeout(1500)
    page.screenshot(path=str(tmp_path / "mlflow-charts.png"))
    # sections top to bottom: the objective (bars, axes against it, the curve ASHA stops on), then MLflow's own
    where = [objective.bounding_box()["y"], axes.bounding_box()["y"]]
    where += [page.get_by_text(name, exact=True).first.bounding_box()["y"] for name in ("epoch", "cost", "Model metrics")]
    assert where == sorted(where), where
    assert page.get_by_text("epoch/knn_top1", exact=True).count() >= 1


def test_report_attached_to_the_sweep_loads_plots_and_links(swept: dict[str, Any], browser: Any,
                                                            tmp_path: Path) -> None:
    from rrscale.tracking import links

    client, parent, trials = swept["client"], swept["parent"], swept["trials"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "plots", "best_config.json"} <= names
    report = Path(client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path)))
    page = browser.new_page()
    page.goto(report.as_uri())
    page.get_by_text("Trials, best first").wait_for()
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    sizes = page.locator("img").evaluate_all("imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth])")
    assert len(sizes) >= 4 and all(width and width > 400 for _, width in sizes), sizes
    assert {"curves", "pareto"} <= {alt for alt, _ in sizes}
    # the sweep wrote to sqlite: links point at `mlflow ui`'s address, and the report says how to start it
    hrefs = set(page.locator("table.trials a").evaluate_all("as => as.map(a => a.href)"))
    for t in trials:
        assert links.run_url(swept["store"], swept["exp"], t.info.run_id) in hrefs
    compare = page.get_by_text("open the comparison in MLflow")
    view = links.comparison_url(parent.info.run_id, swept["uri"]).replace(swept["uri"], links.DEFAULT_UI)
    assert compare.get_attribute("href") == view
    body = page.inner_text("body")
    assert f"mlflow ui --backend-store-uri {swept['store']}" in body and "Which axis mattered" in body
    assert "optuna-dashboard sqlite:///" in body
    # the best trial's link opens its MLflow run (served here by the test's server instead of `mlflow ui`)
    best = page.locator("table.trials a").first
    name = best.get_attribute("title")
    page.goto(best.get_attribute("href").replace(links.DEFAULT_UI, swept["uri"]))
    page.get_by_text(name, exact=True).first.wait_for()
    assert "finished" in page.inner_text("body")
