"""What a trial's job asks of a cluster: its `resources`, from three places, later ones winning:

  the recipe         its scale (GPUs, CPUs, memory, time): studies/recipes/<name>.yaml `resources:`
  the cluster file   this user's site defaults (account, partition, QOS, setup lines, python):
                     $HARNESS_CLUSTER, else ~/.config/harness/cluster.yaml, if it exists
  the study file     this study's own `resources:`

Every key is checked when the study is loaded, naming the file and the key. The SLURM names are
submitit's (and Hydra's submitit launcher's): account, qos, constraint, exclude, gres, ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from harness.run.errors import StudyError

CLUSTER_ENV = "HARNESS_CLUSTER"
DEFAULT_CLUSTER_FILE = Path("~/.config/harness/cluster.yaml")


@dataclass
class Resources:
    gpus: int = 0  # per node
    tasks: int = 0  # processes per node (DDP ranks); 0 = one per GPU, or one without GPUs
    cpus: int = 2  # per node
    mem_gb: float = 8  # per node; 0 = all of the node's memory (--mem=0)
    time_min: int = 60
    partition: str | None = None
    nodes: int = 1
    signal_delay_s: int = 60
    max_timeouts: int = 3
    trials_per_job: int = 1  # trials packed into one job and its devices, one process each (harness.execution.jobs.PackedJob)
    # Site-specific SLURM options (submitit's names); None / empty: not passed.
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. "a100|h100"
    exclude: str | None = None  # nodes to avoid, e.g. "gpu[01-03]"
    gres: str | None = None  # e.g. "gpu:a100:8", for sites that reject --gpus-per-node (gpus is then its count)
    gpus_per_task: int | None = None
    cpus_per_gpu: int | None = None
    mem_per_gpu: float | None = None  # GB; instead of mem_gb
    exclusive: bool = False
    comment: str | None = None
    setup: list = field(default_factory=list)  # shell lines before the job starts (module load, conda activate)
    python: str | None = None  # the job's interpreter, or a container command ending in python
    srun_args: list = field(default_factory=list)
    additional_parameters: dict = field(default_factory=dict)  # any other sbatch option: {name: value}
    # The evaluation as a job of its own, after pretraining (None: the probe ends the trial's own job).
    # Its keys replace the trial's for that job, e.g. {gpus: 1, time_min: 600}; one node, one process;
    # its trials_per_job: evaluations one job runs in turn (they are small).
    eval: dict | None = None

    def for_evaluation(self) -> Resources | None:
        """The evaluation job's resources: the trial's, one node and one process (a probe runs on one
        device) with one GPU's share of its CPUs and memory if it has GPUs, then `eval`'s own keys;
        None without `eval`."""
        if self.eval is None:
            return None
        base = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eval"}
        share = max(self.gpus, 1)
        base.update(nodes=1, tasks=0, trials_per_job=1, gpus=min(self.gpus, 1), gres=None, gpus_per_task=None,
                    cpus=max(1, self.cpus // share), mem_gb=self.mem_gb / share if self.mem_gb else 0)
        return Resources(**{**base, **self.eval})

    def gres_gpus(self) -> int | None:
        """The GPU count a `gres` string asks for per node (gpu:8, gpu:a100:8), None without one."""
        if not self.gres:
            return None
        for part in self.gres.split(","):
            bits = part.strip().split(":")
            if bits[0] == "gpu":
                return int(bits[-1]) if len(bits) > 1 and bits[-1].isdigit() else 1
        return None


WHOLE = ("gpus", "cpus", "nodes", "tasks", "time_min", "max_timeouts", "trials_per_job", "signal_delay_s",
         "gpus_per_task", "cpus_per_gpu")
NUMBERS = ("mem_gb", "mem_per_gpu")
STRINGS = ("partition", "account", "qos", "constraint", "exclude", "gres", "comment", "python")
LISTS = ("setup", "srun_args")
RESOURCE_KEYS = {f.name for f in fields(Resources)}


def _fail(where: Path | str, key: str, message: str) -> StudyError:
    return StudyError(f"{where}: {key}: {message}")


def check_resources(where: Path | str, res: Any, whole: bool = True, prefix: str = "resources") -> None:
    """Each key well-formed; with `whole`, also what holds only for the merged set. `prefix`: how the
    mapping is named in messages (resources, or resources.eval)."""
    if not isinstance(res, dict) or set(res) - RESOURCE_KEYS:
        bad = sorted(set(res) - RESOURCE_KEYS) if isinstance(res, dict) else res
        raise _fail(where, prefix, f"unknown entries {bad}; allowed: {', '.join(sorted(RESOURCE_KEYS))}.")
    for key, value in res.items():
        name = f"{prefix}.{key}"
        if key in STRINGS:
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise _fail(where, name, f"a non-empty string or null is required, got {value!r}.")
        elif key in LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _fail(where, name, f"a list of strings is required, got {value!r}.")
        elif key == "exclusive":
            if not isinstance(value, bool):
                raise _fail(where, name, f"true or false is required, got {value!r}.")
        elif key == "eval":
            if value is not None and not isinstance(value, dict):
                raise _fail(where, name, "a mapping of resources for the evaluation job is required, e.g. "
                                         "{gpus: 1, time_min: 600}, or null.")
            if isinstance(value, dict):
                if "eval" in value or "nodes" in value or "tasks" in value:
                    raise _fail(where, name, "an evaluation job is one process on one node; eval, nodes and "
                                             "tasks have no meaning there (trials_per_job: evaluations a job).")
                check_resources(where, value, whole=False, prefix="resources.eval")
        elif key == "additional_parameters":
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                                      for k, v in value.items()):
                raise _fail(where, name, "a mapping of sbatch option names to values is required, e.g. "
                                         "{reservation: my-slot, mail_type: END}.")
            clash = sorted(k for k in value if k.replace("-", "_") in RESOURCE_KEYS | {"mem", "time", "job_name"})
            if clash:
                raise _fail(where, name, f"{', '.join(clash)} have resources keys of their own; set those instead.")
        elif value is None and key in ("gpus_per_task", "cpus_per_gpu", "mem_per_gpu"):
            continue
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise _fail(where, name, f"a non-negative number is required, got {value!r}.")
        elif key in WHOLE and value != int(value):
            raise _fail(where, name, f"a whole number is required, got {value!r}.")
    if not whole:
        return
    if res.get("nodes", 1) < 1 or res.get("cpus", 1) < 1 or res.get("time_min", 1) < 1:
        raise _fail(where, "resources", "nodes, cpus and time_min must be at least 1.")
    packed = res.get("trials_per_job", 1)
    if packed < 1:
        raise _fail(where, "resources.trials_per_job", f"at least 1 is required, got {packed!r}.")
    if packed > 1 and (res.get("nodes", 1) > 1 or res.get("gpus", 0) > 1 or res.get("tasks", 0) > 1):
        raise _fail(where, "resources.trials_per_job", "packed trials share one device, one process each; a "
                    "trial with several GPUs, tasks or nodes (DDP) cannot be packed. Set trials_per_job: 1, or "
                    "gpus, tasks and nodes to at most 1.")
    if packed > res.get("cpus", packed):
        raise _fail(where, "resources.trials_per_job", f"{packed} trials a job need at least {packed} cpus (one "
                    f"thread each), got cpus: {res['cpus']}.")
    gres = Resources(gres=res.get("gres")).gres_gpus()
    if gres is not None and res.get("gpus", 0) not in (0, gres):
        raise _fail(where, "resources.gres", f"{res['gres']!r} asks for {gres} GPUs a node but resources.gpus is "
                    f"{res['gpus']}; drop gpus (the gres count is used) or make them agree.")


def cluster_file() -> Path | None:
    """The user's cluster file: $HARNESS_CLUSTER (which must exist), else the default one if present."""
    named = os.environ.get(CLUSTER_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise StudyError(f"{CLUSTER_ENV}={named}: no such cluster file. Create it (a `resources` mapping of "
                             f"site defaults, e.g. account: my-lab) or unset {CLUSTER_ENV}.")
        return path
    path = DEFAULT_CLUSTER_FILE.expanduser()
    return path if path.is_file() else None


def load_cluster_defaults() -> tuple[dict, Path | None]:
    """The cluster file's `resources` (or a bare mapping of them), checked key by key."""
    path = cluster_file()
    if path is None:
        return {}, None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({getattr(exc, 'problem', None) or exc}).") from None
    res = data.get("resources", data) if isinstance(data, dict) else data
    check_resources(path, res, whole=False)
    return dict(res), path


def merge(recipe: str, recipe_res: dict, study_path: Path, study_res: dict) -> tuple[Resources, dict[str, str]]:
    """The trial's Resources and, for every key set anywhere, where its value came from."""
    cluster, cluster_path = load_cluster_defaults()
    merged, sources = {}, {}
    for origin, layer in ((f"recipe {recipe}", recipe_res), (f"cluster file {cluster_path}", cluster),
                          (f"study file {study_path}", study_res)):
        for key, value in layer.items():
            merged[key], sources[key] = value, origin
    check_resources(study_path, merged)
    res = Resources(**merged)
    gres_gpus = res.gres_gpus()
    if gres_gpus and not res.gpus:
        res.gpus, sources["gpus"] = gres_gpus, sources["gres"]
    return res, sources
