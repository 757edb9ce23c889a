"""MoCo (harness.model.moco: where m, K, tau and encoder sharing act), backbones, BatchNorm
variants, Shuffle BN and the distributed helpers."""
