"""The experiment schema: one YAML file describes one experiment (and optionally a sweep).

This module is the only place that knows the YAML layout. Everything downstream receives
typed pydantic objects. Every invalid input becomes a :class:`ConfigError` whose message is
one line naming the file, the dotted path and what was expected, so the CLI can print it and
exit with code 2 before anything is started or written.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASET_NAMES = (
    "cifar10",
    "cifar100",
    "cifar100-20",
    "stl10",
    "svhn",
    "imagefolder",
    "parquet",
    "synthetic",
    "moons",
    "circles",
)
BACKBONE_NAMES = ("conv4", "resnet8", "resnet32", "resnet56", "resnet18", "resnet34", "mlp")
AGGREGATION_NAMES = ("cat", "sum", "mean", "max")
DATA_ROOT_ENV = "RRSCALE_DATA_ROOT"
# Bounds on what a config may hold. A real experiment file is a few KB and ~200 values; YAML
# aliases can make 500 bytes expand into billions of values (a "billion laughs" bomb), which
# validation or an error message would then build in memory. Checked before pydantic sees it.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32
VECTOR_DATASETS = ("moons", "circles")
# The 2-D toy sets get their own defaults for every key the file leaves unset (and only those):
# an MLP backbone, and for GEDI the settings measured to solve two moons and two circles (issue 7;
# benchmarks/results/gedi_toy-cpu.json). No normalisation anywhere (a BatchNorm projector collapsed
# every moons run to one cluster), c = 2, tau = 1, beta = 1, lambda_gen = 3 (at 1.0 circles was
# solved by 1 of 3 seeds, at 3.0 by 5 of 5), a 256-wide projector, lr 1e-3, and an SGLD step of
# 0.005 with noise 0.05 (the CIFAR values, c = 2048, tau = 0.1 and step 1.0, diverge on 2-D inputs
# in ~100 steps). The resolved values are in config.json / MLflow params like every other value.
VECTOR_DEFAULTS: dict[str, Any] = {"backbone": {"name": "mlp"}}
VECTOR_GEDI_DEFAULTS: dict[str, Any] = {
    "backbone": {"norm": "none"},
    "method": {
        "clusters": 2,
        "tau": 1.0,
        "beta": 1.0,
        "lambda_gen": 3.0,
        "projector_width": 256,
        "sgld": {"step_size": 0.005, "noise": 0.05, "buffer_size": 1000},
    },
    "train": {"lr": 1.0e-3},
}


class ConfigError(ValueError):
    """A user-facing configuration problem; ``str(err)`` is the one line to print."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the images come from. ``root`` empty means ``$RRSCALE_DATA_ROOT`` or a download."""

    name: Literal[DATASET_NAMES] = "cifar10"  # type: ignore[valid-type]
    root: str = ""
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    download: bool = True
    synthetic_size: int = Field(2000, ge=10, description="train images of the synthetic set")
    knn_subset: int = Field(2000, ge=0, description="labelled images used by the per-epoch kNN")
    probe_name: Literal[DATASET_NAMES] | None = None  # type: ignore[valid-type]
    probe_root: str = ""

    @field_validator("root", "probe_root")
    @classmethod
    def _expand(cls, v: str) -> str:
        """Absolute at load time: Ray runs trials in other working directories."""
        return os.path.abspath(os.path.expanduser(v)) if v else v


class BackboneConfig(_Section):
    """Feature extractor; ``stem``/``norm`` are explicit so nothing changes by dataset name."""

    name: Literal[BACKBONE_NAMES] = "conv4"  # type: ignore[valid-type]
    stem: Literal["imagenet", "cifar"] = "imagenet"
    norm: Literal["batch", "group", "none"] = "batch"
    mlp_width: int = Field(128, ge=1)
    mlp_depth: int = Field(3, ge=1)


class RelationalConfig(_Section):
    """Relational reasoning (Patacchiola & Storkey 2020); defaults are the paper's."""

    name: Literal["relational"] = "relational"
    K: int = Field(32, ge=2)
    aggregation: Literal[AGGREGATION_NAMES] = "cat"  # type: ignore[valid-type]
    head_width: int = Field(256, ge=1)
    head_depth: int = Field(1, ge=1)
    focal_gamma: float = Field(2.0, ge=0.0)
    focal_alpha: float | None = Field(0.5, ge=0.0, le=1.0)
    # A healthy model's focal loss stays below chance level (0.087 with the defaults): an
    # epoch mean 1000x above it only comes from exploding weights (train.lr=1000 gives ~6e6).
    divergence_limit: float = Field(100.0, gt=0.0, description="epoch-mean |loss| that ends the run as diverged")


class SGLDConfig(_Section):
    """Persistent SGLD for GEDI's generative term; defaults follow JEM."""

    steps: int = Field(20, ge=1)
    step_size: float = Field(1.0, gt=0.0)
    noise: float = Field(0.01, ge=0.0)
    buffer_size: int = Field(10000, ge=1)
    reinit_prob: float = Field(0.05, ge=0.0, le=1.0)
    data_noise: float = Field(0.03, ge=0.0)
    batch_size: int = Field(0, ge=0, description="samples per step; 0 = the training batch size")


class GediConfig(_Section):
    """GEDI (Sansone & Manhaeve 2024); unknown author values are explicit defaults here."""

    name: Literal["gedi"] = "gedi"
    K: int = Field(2, ge=2, le=2)
    clusters: int = Field(2048, ge=2)
    tau: float = Field(0.1, gt=0.0)
    beta: float = Field(0.1, ge=0.0)
    lambda_gen: float = Field(1.0, ge=0.0)
    projector_width: int = Field(2048, ge=1)
    projector_norm: Literal["backbone", "batch", "group", "none"] = Field(
        "backbone", description="normalisation after the projector's hidden Linear; 'backbone' = backbone.norm"
    )
    energy_reg: float = Field(0.0, ge=0.0, description="weight of mean LSE^2 of data and samples (Du & Mordatch)")
    divergence_limit: float = Field(1.0e4, gt=0.0)
    sgld: SGLDConfig = Field(default_factory=SGLDConfig)


MethodConfig = Annotated[Union[RelationalConfig, GediConfig], Field(discriminator="name")]


class ViewsConfig(_Section):
    """The RR augmentation recipe; strengths are search axes (methods.md §3)."""

    crop_min_scale: float = Field(0.08, gt=0.0, le=1.0)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    jitter: float = Field(0.8, ge=0.0, le=1.0)
    hue: float = Field(0.2, ge=0.0, le=0.5)
    jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    gray_prob: float = Field(0.2, ge=0.0, le=1.0)
    noise: float = Field(0.05, ge=0.0, description="std of the Gaussian views of vector data")


class TrainConfig(_Section):
    epochs: int = Field(200, ge=0)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.001, gt=0.0)
    seed: int = 1
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["none", "cosine"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = Field(1, ge=1)
    knn_every: int = Field(1, ge=0, description="epochs between kNN evaluations; 0 = never")
    steps_per_epoch: int = Field(0, ge=0, description="cap on steps per epoch; 0 = full pass")
    progress: bool = True


class ProbeConfig(_Section):
    """Linear evaluation protocol of the paper, plus the per-epoch monitors (kNN, online probe)."""

    epochs: int = Field(100, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.001, gt=0.0)
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    online: bool = Field(True, description="train an online linear probe during SSL and report "
                         "online_probe_top1 every epoch (only when the training images have labels)")


class ScalingConfig(_Section):
    """Maps onto Ray Train's ScalingConfig; ``num_workers: 0`` runs the loop in-process."""

    num_workers: int = Field(0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    max_failures: int = Field(2, ge=0)
    storage_path: str = ""


class SearchAxis(_Section):
    """One search dimension: exactly one of choice/uniform/loguniform/int, optionally gated."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[builtins.int, builtins.int] | None = Field(None, alias="int")
    log: bool = False
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchAxis":
        kinds = [k for k in _AXIS_KINDS if getattr(self, _AXIS_KINDS[k]) is not None]
        if len(kinds) != 1:
            raise ValueError("exactly one of choice, uniform, loguniform, int")
        if self.choice is not None and not self.choice:
            raise ValueError("a non-empty choice list")
        for k in ("uniform", "loguniform", "int"):
            rng = getattr(self, _AXIS_KINDS[k])
            if rng is not None and not rng[0] <= rng[1]:
                raise ValueError(f"{k}: [low, high] with low <= high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: a positive low bound")
        if self.log and self.integer is not None and self.integer[0] <= 0:
            raise ValueError("int with log: a positive low bound")
        for key, want in self.when.items():
            problem = when_problem(want)
            if problem:
                raise ValueError(f"when.{key}: {problem} (got {brief(want)})")
        return self

    @property
    def kind(self) -> str:
        """The YAML name of this axis' distribution: choice, uniform, loguniform or int."""
        return next(k for k, attr in _AXIS_KINDS.items() if getattr(self, attr) is not None)

    @property
    def bounds(self) -> tuple[Any, Any] | None:
        return None if self.choice is not None else getattr(self, _AXIS_KINDS[self.kind])

    def extremes(self) -> list[Any]:
        """Values that must each give a valid experiment (every choice, both range ends)."""
        return list(self.choice) if self.choice is not None else list(self.bounds or ())


_AXIS_KINDS = {"choice": "choice", "uniform": "uniform", "loguniform": "loguniform", "int": "integer"}
_SCALARS = (str, int, float, bool, type(None))
#: The comparisons a ``when:`` condition may use besides plain equality (``{key: value}``).
WHEN_COMPARISONS = ("gt", "ge", "lt", "le")
WHEN_OPERATORS = ("eq", "ne", *WHEN_COMPARISONS, "in")
_WHEN_FORM = "a value, or {op: operand} with op in " + "|".join(WHEN_OPERATORS) + " (numbers for gt/ge/lt/le, a list for in)"


def brief(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error lines: never expands more than a few levels or items of a value."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxtuple = 2, 4, 4, 4
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        text = short.repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit str() limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def when_problem(want: Any) -> str:
    """Why ``want`` is not a valid ``when:`` condition, or ``""`` when it is."""
    if isinstance(want, _SCALARS):
        return ""
    if not isinstance(want, dict) or not want:
        return f"expected {_WHEN_FORM}"
    for op, operand in want.items():
        if op not in WHEN_OPERATORS:
            return f"expected {_WHEN_FORM}; unknown operator {brief(op)}"
        if op in WHEN_COMPARISONS and not (_is_number(operand) and math.isfinite(operand)):
            return f"expected a finite number for {op}"
        if op in ("eq", "ne") and not isinstance(operand, _SCALARS):
            return f"expected one value for {op}"
        if op == "in" and not (isinstance(operand, list) and operand and all(isinstance(v, _SCALARS) for v in operand)):
            return "expected a non-empty list of values for in"
    return ""


def when_holds(want: Any, actual: Any) -> bool:
    """Whether ``actual`` meets one ``when:`` condition: equality with a value, or every ``{op: operand}``.

    Comparisons hold only for numbers (never for booleans or strings), so ``{gt: 0}`` on a key that
    is absent or not numeric is simply false.
    """
    if not isinstance(want, dict):
        return actual == want
    for op, operand in want.items():
        if op == "eq":
            ok = actual == operand
        elif op == "ne":
            ok = actual != operand
        elif op == "in":
            ok = actual in operand
        elif not _is_number(actual):
            ok = False
        else:
            ok = {"gt": actual > operand, "ge": actual >= operand, "lt": actual < operand,
                  "le": actual <= operand}[op]
        if not ok:
            return False
    return True


class TuneConfig(_Section):
    num_samples: int = Field(8, ge=1)
    metric: str = "probe_top1"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(0, ge=0, description="0 = as many as resources allow")
    scheduler: Literal["asha", "none"] = "asha"
    # kNN: of the signals every method reports and that mean the same whatever a search changes,
    # it ranked trials as well as the online probe (benchmarks/signal_fidelity.py, README) and it
    # needs no labelled training images, no per-step work and carries no state.
    schedule_metric: str = "knn_top1"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    seed: int = 0
    name: str = ""
    storage_path: str = ""
    num_cpus: int = Field(0, ge=0, description="CPUs of a local Ray started by rrscale; 0 = all")
    dashboard: bool = True


class MlflowConfig(_Section):
    experiment: str = "rrscale"
    tracking_uri: str = ""


class ExperimentConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: MethodConfig = Field(default_factory=RelationalConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    search: dict[str, SearchAxis] = Field(default_factory=dict)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """No method name means relational reasoning; vector toy data gets its own defaults."""
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "relational", **data["method"]}}
        data_section = data.get("data")
        if isinstance(data_section, dict) and data_section.get("name") in VECTOR_DATASETS:
            data = _merge_missing(data, VECTOR_DEFAULTS)
            method = data.get("method")
            if isinstance(method, dict) and method.get("name") == "gedi":
                data = _merge_missing(data, VECTOR_GEDI_DEFAULTS)
        return data

    @model_validator(mode="after")
    def _backbone_fits_data(self) -> "ExperimentConfig":
        vector = self.data.name in VECTOR_DATASETS
        if vector != (self.backbone.name == "mlp"):
            kind = "mlp for the vector datasets" if vector else "an image backbone (not mlp) for image data"
            raise ValueError(f"backbone.name: {kind}")
        return self

    def resolved_method(self) -> MethodConfig:
        """``method`` with its references to other sections resolved, as the method class needs it.

        GEDI's ``projector_norm: backbone`` becomes ``backbone.norm``. The reference stays in the
        config itself (config.json, MLflow params) so that a sweep varying ``backbone.norm`` moves
        the projector's norm with it.
        """
        if isinstance(self.method, GediConfig) and self.method.projector_norm == "backbone":
            return self.method.model_copy(update={"projector_norm": self.backbone.norm})
        return self.method

    def training_dict(self) -> dict[str, Any]:
        """The part that determines a training run (no search/tune/mlflow/scaling)."""
        return self.model_dump(mode="json", exclude={"search", "tune", "mlflow", "scaling"})

    def config_hash(self) -> str:
        blob = json.dumps(self.training_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _merge_missing(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every key of ``defaults`` that it lacks (recursively); its own values win."""
    out = dict(data)
    for key, value in defaults.items():
        if isinstance(value, dict):
            mine = out.get(key)
            out[key] = _merge_missing(mine if isinstance(mine, dict) else {}, value) if (
                mine is None or isinstance(mine, dict)) else mine
        elif key not in out:
            out[key] = value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}``; used for MLflow params and search paths."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign ``value`` at ``a.b.c`` inside nested dict ``d``, creating sections as needed."""
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested ``base`` with dotted ``params`` set.

    ``method.name`` is applied first, whatever its position in ``params``: switching to another
    method replaces the whole ``method`` section (the other method's keys would be unknown there,
    and the new method starts from its own defaults), and the other sampled ``method.*`` values
    then land in the new section instead of being wiped by the switch.
    """
    out = json.loads(json.dumps(base))
    ordered = sorted(params.items(), key=lambda item: item[0] != "method.name")
    for path, value in ordered:
        if path == "method.name" and value != (out.get("method") or {}).get("name"):
            out["method"] = {}
        set_dotted(out, path, value)
    return out


def parse_override(text: str, source: str = "--set") -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is read as YAML so types come out right."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: '{text}': expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except (ValueError, RecursionError) as exc:  # a 5,000-digit int, 1,000 nested brackets
        raise ConfigError(f"{source}: {key}: expected a YAML value ({_yaml_refusal(exc)})") from None
    return key, value


def _yaml_refusal(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0][:80]


def oversized(data: Any, max_values: int = MAX_CONFIG_VALUES, max_depth: int = MAX_CONFIG_DEPTH) -> bool:
    """True when ``data`` holds more than ``max_values`` values once shared references (YAML
    aliases) are expanded, nests deeper than ``max_depth``, or contains itself (``&a [*a]``).

    Counts as it walks and stops at the bound, so checking a bomb costs no more than checking
    the largest acceptable input.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values or depth > max_depth:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for pair in node.items() for v in pair)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return False


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err.get("loc", ())]
    # Discriminated unions put the tag in the location; it is not a key the user wrote.
    loc = [p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "method" and p in ("relational", "gedi"))]
    path = ".".join(loc) or "(top level)"
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    if kind == "extra_forbidden":
        return path, "unknown key"
    if kind == "union_tag_invalid":
        return path + ".name", "one of 'relational', 'gedi'"
    if kind == "union_tag_not_found":
        return path + ".name", "a method name: 'relational' or 'gedi'"
    msg = msg.removeprefix("Value error, ").removeprefix("Input should be ")
    head, sep, rest = msg.partition(": ")
    if not loc and sep and "." in head and " " not in head:  # a cross-field check names its key
        return head, rest
    if msg.startswith(("greater", "less")):
        msg = "a number " + msg
    return path, msg


def _known_keys(model: type[BaseModel], loc: list[str], data: dict[str, Any]) -> list[str]:
    """Names allowed at the parent of an unknown key, for the error line."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        ann = fields[part].annotation
        if part == "method":
            name = (data.get("method") or {}).get("name", "relational")
            ann = GediConfig if name == "gedi" else RelationalConfig
        current = ann
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def validate(data: dict[str, Any], source: str) -> ExperimentConfig:
    """Validate a raw mapping; raise :class:`ConfigError` naming ``source`` on the first problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of sections, got {type(data).__name__}")
    if oversized(data):
        raise ConfigError(f"{source}: (top level): expected at most {MAX_CONFIG_VALUES:,} values nested at most "
                          f"{MAX_CONFIG_DEPTH} deep once YAML aliases are expanded, without self-reference")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        path, expected = _describe(err)
        if err.get("type") == "extra_forbidden":
            loc = [str(p) for p in err["loc"] if p not in ("relational", "gedi")]
            known = _known_keys(ExperimentConfig, loc, data)
            hint = f"; expected one of: {', '.join(known)}" if known else ""
            raise ConfigError(f"{source}: {path}: unknown key{hint}") from None
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {brief(got)})"
        raise ConfigError(f"{source}: {path}: expected {expected}{shown}") from None
    _check_search(cfg, source)
    return cfg


def _method_names(cfg: ExperimentConfig) -> list[str]:
    """The methods a trial of this sweep can run: the choices of a ``method.name`` axis, else the base's."""
    axis = cfg.search.get("method.name")
    if axis is not None and axis.choice is not None:
        return [str(v) for v in axis.choice]
    return [cfg.method.name]


def _condition_values(cfg: ExperimentConfig, path: str, flat: dict[str, Any], source: str) -> dict[str, Any] | None:
    """Values that make every ``when:`` condition of axis ``path`` hold in the experiment ``flat``
    (flattened, one method's defaults), or ``None`` when the conditions cannot hold there.

    Candidates for a condition on ``key`` are the base value, the operands themselves and, when
    ``key`` is searched, its axis' extremes and midpoint; the first that meets the condition is used.
    """
    chosen: dict[str, Any] = {}
    for key, want in cfg.search[path].when.items():
        if key == "method.name":
            if not when_holds(want, flat.get(key)):
                return None
            continue
        if key not in flat:  # a key of another method: the condition never holds for this one
            return None
        candidates: list[Any] = [flat[key]]
        other = cfg.search.get(key)
        if other is not None:
            if not isinstance(want, dict):
                candidates.insert(0, want)
            else:
                candidates += [want[op] for op in ("eq", "ge", "le") if op in want] + list(want.get("in", []))
            candidates.extend(other.extremes())
            if other.bounds is not None:
                candidates.append((other.bounds[0] + other.bounds[1]) / 2)
        hit = next((c for c in candidates if when_holds(want, c)), _MISSING)
        if hit is _MISSING:
            if other is not None:
                raise ConfigError(f"{source}: search.{path}.when.{key}: expected a condition that some value of "
                                  f"search.{key} meets (got {brief(want)})")
            return None
        chosen[key] = hit
    return chosen


_MISSING = object()


def _check_search(cfg: ExperimentConfig, source: str) -> None:
    """Each axis must name a real key, and each of its extreme values must give a valid experiment
    under every method a trial may run while the axis' ``when:`` conditions hold. So a sampled value is
    always applied as written, or the sweep is refused here, before anything starts."""
    base = cfg.model_dump(mode="json", exclude={"search"})
    methods = _method_names(cfg)
    flats = {}
    for name in methods:
        try:
            flats[name] = flatten(ExperimentConfig.model_validate(apply_params(base, {"method.name": name}))
                                  .training_dict())
        except ValidationError:
            flats[name] = flatten(apply_params(base, {"method.name": name}))
    for path, axis in cfg.search.items():
        section = path.split(".")[0]
        if section in ("search", "tune", "mlflow", "scaling") or "." not in path:
            raise ConfigError(f"{source}: search.{path}: expected a dotted training key such as method.K")
        for cond in axis.when:
            if "." not in cond:
                raise ConfigError(f"{source}: search.{path}.when.{cond}: expected a dotted key such as method.name")
        settings = []  # (what the axis' conditions fix, the method named in the error or "")
        for name in methods:
            fixed = _condition_values(cfg, path, flats[name], source)
            if fixed is not None:
                switch = {} if path == "method.name" else {"method.name": name}
                settings.append(({**switch, **fixed}, name if len(methods) > 1 and switch else ""))
        if not settings:  # inactive in this sweep (e.g. a GEDI-only axis in an RR sweep): still a valid axis
            settings.append(({k: v for k, v in axis.when.items() if not isinstance(v, dict)}, ""))
        for fixed, method in settings:
            for value in axis.extremes():
                try:
                    ExperimentConfig.model_validate(apply_params(base, {**fixed, path: value}))
                except ValidationError as exc:
                    err = exc.errors()[0]
                    expected = ("a key that exists in the experiment schema" if err.get("type") == "extra_forbidden"
                                else _describe(err)[1])
                    under = ""
                    if method:
                        under = f" with method.name {method}"
                        expected += "; gate the axis with when: {method.name: ...} to the methods it applies to"
                    raise ConfigError(f"{source}: search.{path}: value {brief(value)} is invalid{under}: "
                                      f"expected {expected}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every I/O or syntax problem into one ConfigError line."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            blob = fh.read(MAX_CONFIG_BYTES + 1)
        text = blob.decode()
    except FileNotFoundError:
        raise ConfigError(f"{p}: (file): expected a readable YAML file (not found)") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: (file): expected a readable YAML file ({type(exc).__name__})") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: (file): expected a YAML file of at most {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: (file): expected valid YAML{where}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{p}: (file): expected valid YAML ({_yaml_refusal(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: (top level): expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load ``path`` (or the defaults when ``None``) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "(defaults)"
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("search.") and key.count(".") >= 2:
            data.setdefault("search", {})[key.removeprefix("search.")] = value
        else:
            set_dotted(data, key, value)
    if overrides:
        source = f"{source} with --set"
    cfg = validate(data, source)
    env_root = os.environ.get(DATA_ROOT_ENV, "")
    if not cfg.data.root and env_root:
        cfg.data.root = os.path.abspath(os.path.expanduser(env_root))
    return cfg


def resolve_data_root(cfg: DataConfig) -> str:
    """``data.root`` if set, else ``$RRSCALE_DATA_ROOT``, else empty (download location)."""
    return cfg.root or os.environ.get(DATA_ROOT_ENV, "")
