"""Typed run configuration: recipes (YAML data files), dotted overrides, validation.

A run is fully described by one `RunConfig`. Recipes live in `studies/recipes/<name>.yaml`
and are plain data (loaded with `yaml.safe_load`: no code runs from a recipe). Every error
names the field and says how to fix it, and is raised before any training starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.run import mechanisms, runio
from harness.run.errors import ConfigError

# the identity's names are the config's too (re-exported): every caller asks the config
from harness.run.identity import RUNTIME_ONLY, get_dotted, identity_diff, identity_digest, identity_of, nest  # noqa: F401
from harness.run.validation import validate

RECIPE_DIR = Path(__file__).resolve().parents[2] / "studies" / "recipes"


class _Section:
    """A config section that a job file pickled by older code restores: a field added since takes its
    default (a requeued job goes on under the code it now finds; its run's identity is unchanged)."""

    def __setstate__(self, state: dict) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name not in state:
                state[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        self.__dict__.update(state)


@dataclass
class DataConfig(_Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder"] = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location (see harness.data)
    train_subset: int | None = None  # first N of a fixed seeded permutation; None = all
    test_subset: int | None = None
    image_size: int = 28  # crop size of the pretraining views
    augmentation: Literal["v1", "v2", "cifar"] = "cifar"
    # RandomResizedCrop area range of the two views. MoCo's recipes all use [0.2, 1]; small images
    # may want milder crops (a 0.2 crop of a 28-px image is 12 px wide; see fmnist-tiny).
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # batched: in-memory datasets augmented on the device; image folders cropped in DataLoader workers
    # (uint8) and coloured on the device (harness.data.folder_views). per_image: the classic pipeline, every
    # step per image in workers (the comparison path, see harness.bench). device_decode (image folders):
    # workers only read the files; decode (nvjpeg on CUDA), crops and colours on the device.
    loader: Literal["batched", "per_image", "device_decode"] = "batched"
    num_workers: int = 2  # DataLoader workers for image folders and the per-image path


@dataclass
class ModelConfig(_Section):
    arch: Literal["resnet_tiny", "resnet18", "resnet50"] = "resnet_tiny"
    stem: Literal["imagenet", "cifar"] = "cifar"  # cifar: 3x3 conv1, stride 1, no max-pool
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # resnet_tiny stage widths
    # resnet_tiny's first conv stride: 2 runs every stage at half the resolution (~4x fewer MACs).
    tiny_stem_stride: int = 1


@dataclass
class MocoConfig(_Section):
    dim: int = 128  # feature dimension of q and k
    queue_size: int = 4096  # K: number of negative keys
    momentum: float = 0.99  # m: key encoder EMA coefficient
    temperature: float = 0.1  # tau
    mlp: bool = False  # MoCo v2 projection head
    # momentum: MoCo; shared: keys from the query encoder (m = 0); end_to_end: keys with gradient, the
    # batch as negatives; memory_bank: Wu et al. 2018's bank of one feature per image (the paper's Fig. 3)
    key_encoder: Literal["momentum", "shared", "end_to_end", "memory_bank"] = mechanisms.DEFAULT
    bank_momentum: float = 0.5  # memory bank: v <- m_b v + (1 - m_b) q (InstDisc: 0.5)
    shuffle_bn: Literal["ddp", "split", "none"] = "split"
    bn_splits: int = 8
    symmetric: bool = False


@dataclass
class OptimConfig(_Section):
    epochs: int = 10
    batch_size: int = 256  # global batch, over all processes
    lr: float = 0.06  # learning rate at batch `lr_batch`; scaled linearly with batch_size
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # epochs, for `step`
    warmup_epochs: int = 0


@dataclass
class EvalConfig(_Section):
    knn_every: int = 1  # epochs between kNN monitor evaluations; 0 = never
    knn_k: int = 200
    knn_t: float = 0.1
    knn_features: Literal["backbone", "head"] = "backbone"
    knn_train_subset: int | None = None  # memory bank size cap (None = the training set)
    knn_test_subset: int | None = None
    # Dictionary diagnostics (harness.training.diagnostics): key consistency against age, alignment/uniformity,
    # effective rank. Epochs between them: None = with the kNN monitor; 0 = never. They read the run,
    # never change it: not part of its identity.
    diagnostics_every: int | None = None
    # Images for alignment, uniformity and effective rank (the rank's cap). 128: with the queue's three
    # regenerated batches the diagnostics cost 2.4 % of a CPU-recipe epoch (256: 3.4 %; bench diagnostics).
    diagnostics_subset: int = 128
    probe: Literal["fast", "standard", "none"] = "fast"  # the protocols: PROBE_PROTOCOLS, and none
    probe_epochs: int = 100  # standard protocol
    probe_lr: float = 30.0
    # L2 on the fc weight. main_lincls: 0 (1.28M ImageNet images); a probe on a small training split
    # overfits without it, as the fast probe's held-out L2 choice shows (see the fmnist-tiny recipe).
    probe_weight_decay: float = 0.0
    probe_batch_size: int = 256
    probe_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])  # fractions of epochs
    # main_lincls's train crop; small images (28-32 px) lose too much at 0.08 (see the fmnist-tiny recipe).
    probe_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # BatchNorm without affine before the fc (the MAE linear probe): standardises the frozen features so
    # one lr suits any backbone. Off = main_lincls exactly.
    probe_feature_bn: bool = False
    pixel_floor: bool = True


@dataclass
class RuntimeConfig(_Section):
    seed: int = 0
    # auto is resolved before a run's identity is taken (resolve_execution): the identity holds what runs.
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda for trials given GPUs, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; fp16: + GradScaler
    channels_last: Literal["auto", "yes", "no"] = "auto"
    compile: bool = False  # torch.compile the encoders: for long GPU runs (compiling takes minutes)
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # 0 = only at epoch boundaries
    keep_checkpoints: int = 2
    # Epochs whose checkpoint is kept besides the newest ones (checkpoints/epochs/), for probes of the
    # run part-way (`python -m harness.study NAME --evaluate fast --epoch E`): a learning curve.
    keep_epochs: list[int] = field(default_factory=list)
    log_every: int = 20  # steps between loss read-backs (and NaN checks)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # DDP: a collective that waits longer than this fails the run (NCCL's default is 10 minutes). No
    # rank waits for another's lone work (harness.model.distributed), so only a real hang gets this far.
    dist_timeout_s: int = 1800


@dataclass
class RunConfig(_Section):
    name: str = "run"
    recipe: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What this run computes (see RUNTIME_ONLY): two configs with one identity are one run."""
        return identity_of(self.to_dict())

    def digest(self) -> str:
        return identity_digest(self.to_dict())

    def scaled_lr(self) -> float:
        return self.optim.lr * self.optim.batch_size / self.optim.lr_batch


# ---------------------------------------------------------------- building from data

def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner)
    if tp is Any:  # a value whose shape its reader checks (a study's factor levels, seeds)
        return value
    if origin is Literal:
        if isinstance(value, bool) and {"yes", "no"} <= set(args):  # YAML reads yes/no as booleans
            value = "yes" if value else "no"
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed; use one of {choices}."
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        return {_coerce(f"{path} (a key)", k, args[0]): _coerce(f"{path}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list such as [1, 2], got {value!r}.")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")  # a bug in this module, not user input


def build_typed(cls: type, data: Any, prefix: str = "", what: str = "config key") -> Any:
    """`cls` (a dataclass, nested ones too) from a mapping, every value checked against its annotation
    (_coerce): the one reading of typed files, run configs and study files alike.

    Raises:
        ConfigError: an unknown key (the nearest named), a missing required one, a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or what.split()[0]}: expected a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in data:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: missing; every {what.split()[0]} declares "
                              f"{', '.join(required)}.")
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown {what} '{path}'.{_suggest(str(key), names)} "
                              f"Valid keys here: {', '.join(sorted(names))}.")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build_typed(tp, value, path, what)
            continue
        try:
            kwargs[key] = _coerce(path, value, tp)
        except ConfigError as exc:  # a field may say what it expects (dataclasses.field(metadata={"expects": ...}))
            expects = next(f.metadata.get("expects") for f in fields if f.name == key)
            raise ConfigError(f"{exc} Expected: {expects}." if expects else str(exc)) from None
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe_data(name: str) -> dict:
    path = RECIPE_DIR / f"{name}.yaml"
    if "/" in name or "\\" in name or ".." in name or not path.is_file():
        raise ConfigError(f"unknown recipe '{name}'.{_suggest(name, recipe_names())} "
                          f"Available recipes: {', '.join(recipe_names())}.")
    stat = path.stat()
    data = _parsed_recipe(str(path), stat.st_mtime_ns, stat.st_size)
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level.")
    return copy.deepcopy(data)  # the caller's to change


@functools.lru_cache(maxsize=64)
def _parsed_recipe(path: str, mtime_ns: int, size: int):
    """A recipe file parsed once per version of it (its time and size): a driver builds the config
    of every point of a study from it, a plan or a report hundreds of times."""
    return runio.load_yaml(Path(path).read_text()) or {}


def parse_override(text: str) -> dict:
    """'moco.momentum=0.99' -> {'moco': {'momentum': 0.99}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected the form section.key=value, e.g. moco.momentum=0.99.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': the key is empty or malformed; e.g. moco.momentum=0.99.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}).") from None
    return nest(key, value)


def make_config(recipe: str, overrides: typing.Sequence[str | dict] = (), name: str | None = None,
                gpus: int | None = None) -> RunConfig:
    """A run's validated configuration: the recipe, then each override in order.

    Args:
        recipe: a name in studies/recipes/ (e.g. "fmnist-tiny").
        overrides: "section.key=value" strings (YAML values) or nested dicts, applied in order.
        name: the run's label (not part of its identity).
        gpus: the GPUs the run's process will have; given, `auto` device and precision are resolved
            to what runs (resolve_execution) before the identity is taken.

    Returns:
        The RunConfig, every field coerced to its type and every section validated.

    Raises:
        ConfigError: an unknown recipe or key (the nearest valid one proposed), a value of the wrong
            type, or a setting that cannot run (K not a multiple of the batch, m outside [0, 1], ...).
    """
    data = load_recipe_data(recipe)
    data.pop("resources", None)  # submission defaults for this scale (harness.planning.studyfile), not run config
    data = _merge(data, {"recipe": recipe})
    for override in overrides:
        data = _merge(data, parse_override(override) if isinstance(override, str) else override)
    if name is not None:
        data["name"] = name
    cfg = build_typed(RunConfig, data)
    validate(cfg)
    return cfg if gpus is None else resolve_execution(cfg, gpus)


def resolve_execution(cfg: RunConfig, gpus: int) -> RunConfig:
    """`auto` device and precision made what will run, for a process given `gpus` GPUs (a study's
    resources.gpus; `python -m harness.train`: the GPUs it sees). Resolved before the run's identity is taken, so
    a CPU fp32 run and a GPU bf16 run are two runs, never shared into each other's studies. bf16 is
    the GPU default (Ampere and newer); an older GPU refuses it at the job's start (harness.training.runtime)
    and says to set runtime.precision=fp16."""
    r = cfg.runtime
    device = r.device if r.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    precision = r.precision if r.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("runtime.precision: fp16 is for CUDA (with a gradient scaler); on a CPU use fp32 or bf16.")
    if (device, precision) == (r.device, r.precision):
        return cfg
    return dataclasses.replace(cfg, runtime=dataclasses.replace(r, device=device, precision=precision))


def config_from_dict(data: dict) -> RunConfig:
    cfg = build_typed(RunConfig, data)
    validate(cfg)
    return cfg


def with_overrides(cfg: RunConfig, overrides: typing.Sequence[str], only: typing.Sequence[str] = ()) -> RunConfig:
    """A validated copy of `cfg` with dotted overrides. `only` lists the keys (or `section.` prefixes)
    that may change: re-probing a finished run may change how it is evaluated, never what its
    checkpoint was trained with."""
    data = cfg.to_dict()
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if only and not any(key == o or (o.endswith(".") and key.startswith(o)) for o in only):
            raise ConfigError(f"override '{text}': only {', '.join(o + '*' if o.endswith('.') else o for o in only)} "
                              f"can change here; the rest is fixed by the run's config.yaml and checkpoint.")
        data = _merge(data, parse_override(text))
    return config_from_dict(data)


# Settings a finished run can be evaluated with afresh (harness.probe, bench probe).
EVAL_ONLY = ("eval.", "data.test_subset")
PROBE_PROTOCOLS = ("fast", "standard")  # eval.probe's protocols (the faces' --protocol / --evaluate choices)


# ---------------------------------------------------------------- semantic validation

def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
