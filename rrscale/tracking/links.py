"""Links into the MLflow UI, and the comparison view a sweep's link opens.

MLflow 3.17 opens an experiment on its GenAI overview; ``#/experiments/<id>/runs?
workflowType=machine_learning`` goes straight to the runs table in model-training mode. The
runs table shows no metric or param column by default, so each sweep also publishes a
*shared view* (MLflow's own "share" mechanism: an experiment tag
``mlflow.sharedViewState.<key>`` holding the table and chart state, opened with
``&viewStateShareKey=<key>``): the table shows the sweep's objective first, then the other
scores, the sampled axes and each trial's outcome; the chart view starts with a section for
the objective (a bar per trial, parallel coordinates of the sampled axes against it, and the
per-epoch curve ASHA stops on), followed by MLflow's own sections (``epoch``, ``cost``, the
unprefixed scores). Without the view the link still opens the runs table.

For a ``sqlite:`` store there is no server: links point at ``mlflow ui``'s default address and
:func:`ui_hint` says how to start it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rrscale.tracking import naming

OPTUNA_STORAGE_TAG = "rrscale.optuna_storage"
OPTUNA_STUDY_TAG = "rrscale.optuna_study"
SWEEP_DIR_TAG = "rrscale.sweep_dir"
#: MLflow's tag prefix for shared views of an experiment (read by its runs page).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: Where ``mlflow ui`` listens by default.
DEFAULT_UI = "http://127.0.0.1:5000"
#: Columns of MLflow's runs table are ``<type>.`<key>```.
_RUN_NAME_COLUMN = "attributes.`Run Name`"


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, or ``mlflow ui``'s default for a file store."""
    uri = tracking_uri.rstrip("/")
    return uri if uri.startswith(("http://", "https://")) else DEFAULT_UI


def ui_hint(tracking_uri: str) -> str:
    """The command that serves the UI for a store without a server ("" for a server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def view_key(sweep: str) -> str:
    """The share key of a sweep's comparison view (URL- and tag-safe)."""
    return "rrscale-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", sweep) or "sweep")


def published_view(experiment_tags: dict[str, str], sweep: str) -> str:
    """The sweep's view key when its experiment holds that view (sweeps logged before rrscale
    published views have none: their link opens the plain runs table)."""
    key = view_key(sweep)
    return key if VIEW_TAG_PREFIX + key in experiment_tags else ""


def experiment_url(tracking_uri: str, experiment_id: str, view: str = "") -> str:
    """The experiment's runs table (model-training mode), with the shared view ``view`` if given."""
    url = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def comparison_view(metric: str, axes: list[str], curve: str = "knn_top1") -> dict[str, Any]:
    """MLflow's runs-page state for one sweep: table columns and chart sections (see the
    module docstring). ``metric``: the sweep's objective; ``axes``: the sampled dotted keys;
    ``curve``: the per-epoch value shown with it (the one ASHA stops on)."""
    scores = list(dict.fromkeys([metric, "probe_top1", "knn_top1"]))
    columns = ([_column("metrics", m) for m in scores] + [_column("params", a) for a in axes]
               + [_column("tags", "rrscale.status"), _column("attributes", "Dataset")])
    objective = "rrscale-objective"
    card = {"isGenerated": False, "deleted": False, "metricSectionId": objective}
    curve_key = naming.epoch_metric(curve)
    charts = [
        {**card, "uuid": "rrscale-score", "type": "BAR", "metricKey": metric},
        {**card, "uuid": "rrscale-axes", "type": "PARALLEL", "selectedParams": list(axes),
         "selectedMetrics": [metric], "showAllRuns": False},
        {**card, "uuid": "rrscale-curve", "type": "LINE", "metricKey": curve_key, "selectedMetricKeys": [curve_key],
         "xAxisKey": "step", "selectedXAxisMetricKey": "", "scaleType": "linear", "xAxisScaleType": "linear",
         "lineSmoothness": 0, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": True, "yAxisKey": "metric",
         "yAxisExpressions": [], "ignoreOutliers": False, "range": {}},
    ]
    names = [(objective, f"{metric}: the sweep's objective")]
    names += [(f"rrscale-{n.rstrip('/')}", n.rstrip("/")) for n in (naming.EPOCH_PREFIX, naming.COST_PREFIX)]
    names += [("rrscale-scores", "Model metrics"), ("rrscale-system", "System metrics")]
    sections = [{"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False,
                 "isGenerated": False} for uuid, name in names]
    return {"selectedColumns": columns, "columnOrder": [_RUN_NAME_COLUMN, *columns],
            "columnWidths": {_RUN_NAME_COLUMN: 300},
            "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": True}


def comparison_url(parent_run_id: str, tracking_uri: str) -> str:
    """The one-click comparison of a sweep: its experiment's runs table with the sweep's view.
    ``""`` when the parent run cannot be read (tracking down)."""
    from rrscale.tracking import mlflow as tracking

    run = tracking.get_run(parent_run_id, tracking_uri=tracking_uri)
    if run is None:
        return ""
    sweep = run.data.tags.get(tracking.SWEEP_TAG) or run.info.run_name or parent_run_id
    return experiment_url(tracking_uri, run.info.experiment_id, view_key(sweep))


def publish_comparison_view(parent_run_id: str, tracking_uri: str) -> str:
    """Write the sweep's comparison view (from the parent run's ``search.*`` and ``tune.*``
    params) as an experiment tag; return its URL (``""`` when tracking is down)."""
    from rrscale.tracking import mlflow as tracking

    run = tracking.get_run(parent_run_id, tracking_uri=tracking_uri)
    if run is None:
        return ""
    params = run.data.params
    axes = [k.removeprefix("search.") for k in params if k.startswith("search.")]
    metric = params.get("tune.metric", "probe_top1")
    curve = params.get("tune.schedule_metric", "knn_top1")
    sweep = run.data.tags.get(tracking.SWEEP_TAG) or run.info.run_name or parent_run_id
    view = comparison_view(metric, axes, curve)
    tracking.set_experiment_tag(tracking_uri, run.info.experiment_id, VIEW_TAG_PREFIX + view_key(sweep),
                                json.dumps(view, separators=(",", ":")))
    return experiment_url(tracking_uri, run.info.experiment_id, view_key(sweep))
