"""One pretraining run (harness.training.pretrain), its checkpoints and runtime, the kNN monitor,
the linear probes, the dictionary diagnostics and the training step the benchmarks share."""
