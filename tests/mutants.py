"""Deliberate one-line bugs, and the tests that must catch each: proof that the suite can fail.

Run by hand, not in CI (each mutant runs its tests in a scratch copy of the tree, minutes in all):

    python tests/mutants.py                  # every mutant; prints caught / SURVIVED / stale per mutant
    python tests/mutants.py --list           # names only
    python tests/mutants.py queue-pointer    # some of them
    python tests/mutants.py --json out.json  # also the table as JSON (compare two commits' lists)

A mutant replaces one exact piece of code (it must occur exactly once) in a scratch copy of the
working tree; its tests then run there (`pytest -p no:xdist`, servers started by the tests as
usual). Caught: at least one of them fails. SURVIVED: all pass, so the mechanism is untested.
Stale: the code it breaks was changed; update the mutant with the change (never delete it silently).
The list gathers the mutants the notes of earlier issues describe (issue 13 and after)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids; one failing catches the mutant


MUTANTS = [
    Mutant("ema-swapped", "harness/model/moco.py",
           "torch._foreach_mul_(k_params, self.m)\n        torch._foreach_add_(k_params, torch._foreach_mul(q_params, 1.0 - self.m))",
           "torch._foreach_mul_(k_params, 1.0 - self.m)\n        torch._foreach_add_(k_params, torch._foreach_mul(q_params, self.m))",
           ("tests/model/test_moco.py::test_momentum_update_is_exact_ema_of_parameters_only",)),
    Mutant("queue-pointer", "harness/model/moco.py",
           "self._ptr = (ptr + batch) % self.K", "self._ptr = ptr",
           ("tests/model/test_moco.py::test_queue_is_fifo_and_pointer_wraps",)),
    Mutant("no-temperature", "harness/model/moco.py",
           "self.queue.clone().detach())  # N x K\n        logits = torch.cat([l_pos, l_neg], dim=1) / self.T",
           "self.queue.clone().detach())  # N x K\n        logits = torch.cat([l_pos, l_neg], dim=1)",
           ("tests/model/test_moco.py::test_logits_put_positive_first_divide_by_T_and_loss_is_cross_entropy",)),
    Mutant("keys-not-unshuffled", "harness/model/shuffle_bn.py",
           "    return x[idx_unshuffle]", "    return x",
           ("tests/model/test_moco.py::test_split_shuffle_then_unshuffle_restores_order",
            "tests/model/test_moco.py::test_split_shuffle_bn_hides_the_order_from_bn_and_returns_keys_in_order")),
    Mutant("resume-at-step-0", "harness/training/pretrain.py",
           "batches = self.views.epoch(s.epoch, s.step_in_epoch, indices=True)",
           "batches = self.views.epoch(s.epoch, 0, indices=True)",
           ("tests/training/test_train.py::test_resume_after_sigkill_is_bit_identical",)),
    Mutant("no-checkpoint-loaded", "harness/training/pretrain.py",
           "saved = ckpt.load_latest(self.run_dir / \"checkpoints\")", "saved = None",
           ("tests/training/test_train.py::test_resume_after_sigkill_is_bit_identical",
            "tests/training/test_train.py::test_corrupt_newest_checkpoint_falls_back_to_previous")),
    Mutant("no-retries", "harness/execution/plans.py",
           "if sum(t.state == FAIL and not t.user_attrs.get(record.NEVER_RAN) for t in tries) <= self.study.retries:",
           "if sum(t.state == FAIL and not t.user_attrs.get(record.NEVER_RAN) for t in tries) <= 0:",
           ("tests/training/test_crash.py",)),
    Mutant("probe-tests-on-train", "harness/training/probe.py",
           "test_feats, test_labels = extract(backbone, split_batches(cfg, \"test\", device, splits), device)",
           "test_feats, test_labels = extract(backbone, split_batches(cfg, \"train\", device, splits), device)",
           ("tests/training/test_eval.py::test_image_folder_run_is_pretrained_and_probed_by_both_protocols",)),
    Mutant("idx-cache-never-read", "harness/data/datasets.py",
           "    if cached.exists():\n        return cached\n",
           "    if False:\n        return cached\n",
           ("tests/data/test_data.py",)),
    Mutant("relu-before-residual", "harness/model/backbones.py",
           "return self.relu(out + identity)", "return self.relu(out) + identity",
           ("tests/model/test_moco.py::test_the_tiny_resnets_basic_block_is_torchvisions",)),
    Mutant("no-heartbeat-grace", "harness/execution/storage.py",
           "return time.monotonic() - self.last_outage > (self.grace_period or 0)", "return True",
           ("tests/execution/test_outage.py::test_no_heartbeat_is_judged_until_a_grace_period_after_an_outage",)),
    Mutant("waiting-trial-not-grouped", "harness/execution/plans.py",
           "enqueued = enqueued_params(t) if t.state == WAITING else {}", "enqueued = {}",
           ("tests/execution/test_plans.py",)),
    Mutant("constant-schedule", "harness/training/step.py",
           "return base * 0.5 * (1.0 + math.cos(math.pi * epoch / o.epochs))", "return base",
           ("tests/training/test_train.py::test_learning_rate_schedule_warm_up_cosine_and_step_values",
            "tests/training/test_train.py::test_training_steps_use_the_schedule")),
    Mutant("driver-keeps-its-lock", "harness/execution/driver.py",  # close() releases nothing: the lock lives as long as the driver
           "        lock = getattr(self, \"_lock\", None)\n        self._lock = None\n", "        lock = None\n",
           ("tests/execution/test_suite.py::test_a_suite_trains_each_shared_run_once_and_reports_on_one_page",)),
    Mutant("crops-from-the-global-rng", "harness/data/folder_views.py",
           "g = seeded_generator(\"item\", *seed_key, index)", "g = None",
           ("tests/data/test_folder_views.py::test_workers_persist_and_any_count_gives_the_same_batches_from_any_step",)),
    Mutant("workers-not-persistent", "harness/data/folder_views.py",
           "persistent_workers=workers > 0", "persistent_workers=False",
           ("tests/data/test_folder_views.py::test_workers_persist_and_any_count_gives_the_same_batches_from_any_step",)),
    # The GPU step (issue 34): a sync or a blocking copy in the augmentation, the dictionary broadcast again.
    Mutant("sync-in-augmentation", "harness/data/augment.py",
           "        mean, std = self._constants(x.device)\n",
           "        mean, std = self._constants(x.device)\n        x.sum().item()\n",
           ("tests/training/test_step.py::test_a_steady_step_has_no_host_sync_no_blocking_copy_and_few_ops",)),
    Mutant("blocking-copy", "harness/data/augment.py",
           "return table.to(device, non_blocking=True)", "return table.to(device)",
           ("tests/training/test_step.py::test_a_steady_step_has_no_host_sync_no_blocking_copy_and_few_ops",)),
    Mutant("dictionary-broadcast", "harness/model/distributed.py",
           "    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, not_broadcast)\n", "",
           ("tests/model/test_ddp.py::test_ddp_does_not_broadcast_the_queue_or_the_bank_but_still_the_batchnorm_statistics",)),
    Mutant("bench-step-unscaled-lr", "harness/training/step.py",
           "out = moco(x_q, x_k, index, learning_rate(cfg, epoch, in_epoch, per_epoch), taken)",
           "out = moco(x_q, x_k, index, cfg.optim.lr, taken)",
           ("tests/training/test_step.py::test_a_bench_step_and_a_run_step_from_the_same_state_give_the_same_parameters",)),
    # issue 35: the mechanisms' facts from the table alone
    Mutant("validation-names-mechanisms", "harness/run/validation.py",
           "    if mech.has_queue:", '    if m.key_encoder in ("momentum", "shared"):',
           ("tests/run/test_mechanisms.py::test_adding_a_row_is_all_validation_and_identity_need",)),
    # issue 39: interaction contrasts paired by seed
    Mutant("interaction-unpaired", "harness/reporting/interaction.py",
           "    y11, y12, y21, y22 = ([c[s] for s in seeds] for c in corners)",
           "    y11, y12, y21, y22 = ([c[s] for s in (seeds if i % 2 else seeds[::-1])] for i, c in enumerate(corners))",
           ("tests/reporting/test_interaction.py::test_the_interval_is_the_paired_one",)),
    Mutant("mlflow-sends-every-point-again", "harness/execution/tracking.py",
           "if not points or points[0].x <= run.last[_kind(points[0])]:", "if not points or points[0].x < run.last[_kind(points[0])]:",
           ("tests/execution/test_tracking.py::test_the_driver_relays_a_study_to_mlflow_through_an_outage",)),
    Mutant("mlflow-trusts-a-fresh-cursor", "harness/execution/tracking.py",
           "last = {kind: max((m.step for m in self.client.get_metric_history(run.info.run_id, mark)), default=-1)",
           "last = {kind: -1",
           ("tests/execution/test_tracking.py::test_the_driver_relays_a_study_to_mlflow_through_an_outage",)),
    Mutant("early-agreement-need-not-last", "harness/reporting/early.py",
           "        if not (row.same_order and row.same_decisions):\n            break",
           "        if not (row.same_order and row.same_decisions):\n            continue",
           ("tests/reporting/test_early.py::test_the_earliest_epoch_from_which_the_monitor_agrees_for_good",)),
    Mutant("verdict-unpaired", "harness/reporting/verdicts.py",
           "paired = by_seed.dropna()", "paired = by_seed.apply(lambda c: c.sample(frac=1.0, random_state=1).to_numpy())",
           ("tests/reporting/test_report.py::test_verdict_speaks_the_decisions_language_and_flags_a_loss_at_chance",)),
    Mutant("folder-walked-per-evaluation", "harness/data/folder_views.py",
           "@functools.lru_cache(maxsize=8)\ndef folder_index", "def folder_index",
           ("tests/data/test_folder_views.py::test_a_run_walks_its_image_folder_once",)),
    Mutant("evaluation-never-retried", "harness/execution/driver.py",
           "for attempt in range(self.study.retries + 1):\n            todo = pending()",
           "for attempt in range(1):\n            todo = pending()",
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("second-protocol-overwrites-the-first", "harness/run/evaluations.py",
           'return run_dir / ("probe.json" if protocol == made_with["eval"]["probe"] else f"probe-{protocol}.json")',
           'return run_dir / "probe.json"',
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("probe-state-not-resumed", "harness/training/probe.py",
           "saved = resume.load() if resume is not None else None", "saved = None",
           ("tests/training/test_eval.py::test_a_standard_probe_killed_mid_way_resumes_to_the_uninterrupted_result",)),
    Mutant("cmyk-to-the-batched-decode", "harness/data/folder_views.py",
           "jpegs = [i for i, c in enumerate(components) if c in (1, 3)]",
           "jpegs = [i for i, c in enumerate(components) if c is not None]",
           ("tests/data/test_folder_views.py::test_device_decode_takes_cmyk_damaged_files_and_a_failed_batch_image_by_image",)),
    Mutant("unreadable-file-stops-the-epoch", "harness/data/folder_views.py",
           "    except (OSError, ValueError, SyntaxError):\n        height, width = shape",
           "    except SyntaxError:\n        height, width = shape",
           ("tests/data/test_folder_views.py::test_device_decode_takes_cmyk_damaged_files_and_a_failed_batch_image_by_image",)),
    Mutant("trial-job-probes-itself", "harness/execution/driver.py",
           "probe=self.eval_resources is None)))", "probe=True)))",
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("split-bn-evaluates-with-a-stale-estimate", "harness/model/batchnorm.py",
           "        if not mode:  # evaluation normalises with the shared estimate: the splits' mean, now\n            self._average_splits()",
           "        pass",
           ("tests/model/test_moco.py::test_split_batchnorm_normalises_each_split_on_its_own",)),
    Mutant("split-bn-saves-a-stale-estimate", "harness/model/batchnorm.py",
           "        self._average_splits()  # a checkpoint's running_mean/var are the splits' mean, as the Colab's\n",
           "",
           ("tests/model/test_moco.py::test_split_batchnorm_keeps_the_colabs_running_estimates_without_averaging_every_step",)),
    Mutant("split-bn-folds-a-channels-last-batch", "harness/model/batchnorm.py",
           "        if x.is_contiguous():\n", "        if True:\n",
           ("tests/model/test_moco.py::test_split_batchnorm_keeps_channels_last_and_normalises_as_in_nchw",)),
    Mutant("split-bn-returns-an-autograd-view", "harness/model/batchnorm.py",
           "        return torch.ops.aten._unsafe_view(out, (n, c, h, w))", "        return out.view(n, c, h, w)",
           ("tests/training/test_step.py::test_a_steady_step_has_no_host_sync_no_blocking_copy_and_few_ops",)),
    Mutant("a-failed-member-fails-the-whole-pack", "harness/execution/jobs.py",
           "            except Exception as exc:\n                failures[member.run_dir] = f\"{type(exc).__name__}: {exc}\"[:500]",
           "            except Exception:\n                raise",
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("packed-trials-outlive-their-job", "harness/execution/jobs.py",
           "    _die_with(job_pid)\n    try:\n        member()", "    try:\n        member()",
           ("tests/execution/test_study.py::test_a_packed_job_killed_alone_takes_its_trials_with_it",)),
    Mutant("evaluation-in-the-identity", "harness/run/identity.py",
           "    out.pop(EVALUATION, None)\n", "",
           ("tests/execution/test_lifecycle.py::test_identity_ignores_how_a_run_executes_but_not_what_it_computes",
            "tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command")),
    Mutant("a-shared-run-without-the-probe-is-trained-again", "harness/execution/driver.py",
           "        if result.outcome not in (Outcome.COMPLETED, Outcome.DIVERGED) and not pretrained:",
           "        if result.outcome not in (Outcome.COMPLETED, Outcome.DIVERGED):",
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("another-probe-read-as-the-trials", "harness/run/evaluations.py",
           'return next((r for r in results(run_dir) if r["settings"] == probe_settings), None)',
           'return next((r for r in results(run_dir) if r["protocol"] == probe_settings["protocol"]), None)',
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("a-run-resumed-at-its-end-loses-its-final-figures", "harness/training/pretrain.py",
           "            self.last = next((r for r in reversed(kept)", "            self.last = {} if True else next((r for r in reversed(kept)",
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("kept-epochs-not-kept", "harness/training/pretrain.py",
           "            if epoch_end and self.state.epoch in self.cfg.runtime.keep_epochs:",
           "            if False:", ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("a-part-way-probe-read-as-the-last", "harness/run/evaluations.py",
           '"epoch": epoch or config["optim"]["epochs"]', '"epoch": config["optim"]["epochs"]',
           ("tests/execution/test_evaluate.py::test_a_finished_study_gets_the_standard_probe_by_one_command",)),
    Mutant("sqlite-schema-race-not-retried", "harness/execution/storage.py", '"already exists" in str(exc)', "False",
           ("tests/execution/test_storage.py::test_studies_opened_at_once_on_a_new_sqlite_file",)),
    Mutant("freeze-every-trial", "harness/run/process.py", "    if _frozen:\n        return\n", "",
           ("tests/run/test_process.py::test_a_process_freezes_its_imports_once_never_a_trials_garbage_for_the_next",)),
    Mutant("a-run-reads-a-map-of-the-dataset-file", "harness/data/datasets.py",
           "return (images.clone() if mapped else images), labels", "return images, labels",
           ("tests/data/test_data.py::test_a_run_holds_its_images_in_memory_never_a_map_of_the_file",)),
    Mutant("a-command-imports-with-the-collector-running", "harness/train.py",
           "    with process.start_up():  # torch, imported now", "    if True:  # torch, imported now",
           ("tests/run/test_process.py::test_a_process_imports_with_the_collector_paused_then_resumes_it",)),
    Mutant("the-collector-never-resumed", "harness/run/process.py", "        gc.enable()", "        pass",
           ("tests/run/test_process.py::test_a_process_imports_with_the_collector_paused_then_resumes_it",)),
    Mutant("a-report-elsewhere-writes-into-the-study", "harness/reporting/study_report.py",
           "(out if out_dir else study_dir) / \"tensorboard\"", "study_dir / \"tensorboard\"",
           ("tests/reporting/test_report.py::test_report_tables_match_independent_computation",)),
]


def scratch_copy(into: Path) -> Path:
    """The working tree as it is (tracked and untracked files git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def run_mutant(mutant: Mutant, tree: Path) -> dict:
    target = tree / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        return {"mutant": mutant.name, "result": "stale", "why": f"{mutant.path}: the code it breaks "
                f"occurs {original.count(mutant.old)} times (expected once)"}
    target.write_text(original.replace(mutant.old, mutant.new))
    try:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                               "-o", "addopts=", "--no-header", "-rf", *mutant.tests], cwd=tree, env=env,
                              capture_output=True, text=True)
        failed = sorted({line[len("FAILED "):].split(" - ", 1)[0] for line in proc.stdout.splitlines()
                         if line.startswith("FAILED ")})
        result = "caught" if proc.returncode == 1 and failed else "SURVIVED" if proc.returncode == 0 else "error"
        return {"mutant": mutant.name, "result": result, "by": failed, "seconds": round(time.monotonic() - start),
                **({"output": proc.stdout[-2000:] + proc.stderr[-2000:]} if result == "error" else {})}
    finally:
        target.write_text(original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}; --list names them")
    if args.list:
        print("\n".join(f"{m.name}: {m.path} -> {', '.join(m.tests)}" for m in chosen))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        tree = scratch_copy(Path(scratch))
        for mutant in chosen:
            row = run_mutant(mutant, tree)
            results.append(row)
            print(f"{row['result']:>8}  {mutant.name}  {' '.join(row.get('by', [])) or row.get('why', '')}", flush=True)
            if row["result"] == "error":
                print(row["output"], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r["result"] != "caught"]
    print(f"{len(results) - len(bad)} of {len(results)} mutants caught" + (f"; not: {', '.join(r['mutant'] for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
