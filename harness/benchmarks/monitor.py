"""`python -m harness.bench monitor --run A,B[,...]`: what the per-epoch kNN monitor costs against the
training it watches, and how its estimate moves with its bank size (eval.knn_train_subset).

For each finished run: the features of its whole training split and of the monitor's test images
(eval.knn_test_subset) are extracted once, seconds per image timed; then the kNN top-1 on seeded banks
of n training images (DRAWS draws each) against the whole split's. For each pair of runs: how often a bank
of n orders the two as the whole split does (the same bank for both, as the monitor's fixed subset is
the same in every run of a study). The training epoch is timed here too (steps of the recipe's step on
the run's images), so the fraction is of one process, one machine, one thread count.
"""
from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import torch

from harness.benchmarks.options import BenchOptions
from harness.data.datasets import NUM_CLASSES, load_tensors, pretrain_views
from harness.run.config import with_overrides
from harness.training.features import encoder_features, extract_split
from harness.training.knn import knn_accuracy
from harness.training.probe import load_trained_encoder
from harness.training.runtime import Runtime, synchronize
from harness.training.step import build_step

BANKS = (500, 1000, 2000, 5000)  # and the whole training split
DRAWS = 5


def _epoch_seconds(cfg, rt, splits, steps: int, warmup: int) -> float:
    """One training epoch of this config, from `steps` timed steps of the run's own step."""
    views = pretrain_views(cfg, rt.device, splits=splits)
    step = build_step(cfg, rt, bank_size=views.size)
    batches = views.epoch(0, 0, indices=True)
    tic = 0.0
    for i, (x_q, x_k, index) in zip(range(warmup + steps), batches):
        if i == warmup:
            synchronize(rt.device)
            tic = time.perf_counter()
        step(x_q, x_k, index, cfg.scaled_lr(), global_step=i)
    synchronize(rt.device)
    return (time.perf_counter() - tic) / steps * views.steps_per_epoch


def bench_monitor(args: BenchOptions) -> list[dict]:
    if not args.run:
        raise SystemExit("error: bench monitor needs --run DIR[,DIR...] (finished pretraining runs of one recipe)")
    rows, scores = [], {}
    epoch_s = None
    for run in args.run.split(","):
        cfg, encoder, epoch = load_trained_encoder(Path(run), torch.device("cpu"))
        cfg = with_overrides(cfg, args.overrides)
        rt = Runtime.for_config(cfg).apply()
        encoder = encoder.to(rt.device)
        splits = load_tensors(cfg)
        if epoch_s is None:
            epoch_s = _epoch_seconds(cfg, rt, splits, args.steps, args.warmup)
        e, model = cfg.eval, encoder_features(encoder, cfg.eval.knn_features)
        tic = time.perf_counter()
        bank, bank_labels = extract_split(model, cfg, "train", rt.device, splits, None)
        synchronize(rt.device)
        per_image = (time.perf_counter() - tic) / len(bank_labels)
        test, test_labels = extract_split(model, cfg, "test", rt.device, splits, e.knn_test_subset)
        classes = NUM_CLASSES[cfg.data.dataset]
        full = knn_accuracy(bank, bank_labels, test, test_labels, classes, e.knn_k, e.knn_t)
        scores[run] = {len(bank_labels): [full]}
        for n in (*(b for b in BANKS if b < len(bank_labels)), len(bank_labels)):
            draws = scores[run].setdefault(n, [])
            if n < len(bank_labels):
                for d in range(DRAWS):
                    pick = torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(d))[:n]
                    draws.append(knn_accuracy(bank[pick], bank_labels[pick], test, test_labels, classes, e.knn_k, e.knn_t))
            tic = time.perf_counter()
            knn_accuracy(bank[:n], bank_labels[:n], test, test_labels, classes, e.knn_k, e.knn_t)
            seconds = per_image * (n + len(test_labels)) + time.perf_counter() - tic
            rows.append({"part": "monitor", "run": Path(run).name, "epoch": epoch, "bank": n, "test": len(test_labels),
                         "top1": statistics.mean(draws), "sd_points": 100 * statistics.pstdev(draws),
                         "minus_whole_points": 100 * (statistics.mean(draws) - full), "monitor_s": seconds,
                         "epoch_s": epoch_s, "fraction_of_epoch": seconds / epoch_s})
    for a, b in itertools.combinations(scores, 2):
        whole = max(scores[a])
        sign = scores[a][whole][0] > scores[b][whole][0]
        for n in scores[a]:
            same = [(x > y) == sign for x, y in zip(scores[a][n], scores[b][n])]
            rows.append({"part": "monitor", "pair": f"{Path(a).name} vs {Path(b).name}", "bank": n,
                         "difference_points": 100 * (statistics.mean(scores[a][n]) - statistics.mean(scores[b][n])),
                         "whole_difference_points": 100 * (scores[a][whole][0] - scores[b][whole][0]),
                         "same_order": f"{sum(same)}/{len(same)}"})
    return rows
