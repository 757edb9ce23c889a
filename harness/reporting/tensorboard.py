"""A study's runs as TensorBoard logs: `tensorboard --logdir results/<study>/tensorboard`.

Written from each run's metrics.jsonl (the run's own record, truncated to its checkpoint when a run
resumes), so a run killed and resumed mid-epoch has each step once, and training never waits on it:
the report (and `python -m harness.report`) rewrites every run's log whole. Per logged step: loss,
learning rate; per epoch: loss, pretext accuracy, the kNN monitor, the dictionary diagnostics; the
final probe; and an HParams record (the study's factors and seed, the final metrics), so the HParams
view compares levels. A run is named by its point (`momentum=0.99,seed=1`).

The `tensorboard` package writes the files (an optional dependency: `pip install -e '.[track]'`); no
TensorFlow or torch is needed.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from harness.run import curves, runio
from harness.run.curves import FINAL_METRICS


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def write_study(trials: pd.DataFrame, factors: list[str], study_dir: Path, out: Path) -> list[Path]:
    """Every trial with a run directory as one TensorBoard run under `out` (rewritten whole). The
    HParams experiment lists the factors (with their levels) and seed, and the final metrics."""
    if out.exists():
        shutil.rmtree(out)
    written = []
    domains = {f: sorted({v for v in trials[f].dropna()}, key=str) for f in factors} if len(trials) else {}
    for _, t in trials.iterrows():
        if not t.get("run_dir") or not isinstance(t.get("key"), str):
            continue
        records = runio.read_jsonl(study_dir / t["run_dir"] / "metrics.jsonl")
        hparams = {f: t[f] for f in factors if pd.notna(t[f])}
        hparams["seed"] = int(t["seed"]) if pd.notna(t.get("seed")) else None
        final = curves.final(t.to_dict())
        written.append(write_run(out / t["key"], records, hparams, final, domains, str(t["state"])))
    return written


def write_run(logdir: Path, records: list[dict], hparams: dict[str, Any], final: dict[str, float],
              domains: dict[str, list], state: str) -> Path:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir))
    try:
        for point in curves.points(records):
            writer.add_event(_scalar_event(point.series, point.value, point.x))
        for key, value in final.items():
            writer.add_event(_scalar_event(f"final/{key}", value, curves.last_epoch(records)))
        for event in _hparams_events({k: v for k, v in hparams.items() if v is not None}, final, domains, state):
            writer.add_event(event)
    finally:
        writer.close()
    return logdir


def _scalar_event(tag: str, value: float, step: int):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def _hparams_events(hparams: dict[str, Any], final: dict[str, float], domains: dict[str, list], state: str):
    """The HParams plugin's three records (experiment, session start, session end), as protocol
    buffers (the plugin's own summary helpers need TensorFlow)."""
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos = []
    for name, value in hparams.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = api_pb2.DATA_TYPE_STRING
            levels = [struct_pb2.Value(string_value=str(v)) for v in domains.get(name, [])]
        else:
            kind = api_pb2.DATA_TYPE_FLOAT64
            levels = [struct_pb2.Value(number_value=float(v)) for v in domains.get(name, [])]
        info = api_pb2.HParamInfo(name=name, type=kind)
        if levels:
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=levels))
        infos.append(info)
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"final/{m}")) for m in FINAL_METRICS])
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in hparams.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            start.hparams[name].string_value = str(value)
        else:
            start.hparams[name].number_value = float(value)
    status = api_pb2.STATUS_SUCCESS if state == "COMPLETE" else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status)
    events = []
    for tag, data in ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                      (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
                      (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))):
        data.version = metadata.PLUGIN_DATA_VERSION
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()))
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=meta,
                                                                     tensor=metadata.NULL_TENSOR)])
        events.append(event_pb2.Event(wall_time=time.time(), summary=summary))
    return events

