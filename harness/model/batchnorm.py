"""SplitBatchNorm: BatchNorm over `num_splits` sub-batches independently (the CIFAR-10 Colab's
single-device stand-in for multi-GPU BN). Sample n falls in split n % num_splits. With one
split it is plain BatchNorm2d."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by bn_splits={s}")
        # One running estimate per split during the step, averaged back afterwards.
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(-1, c * s, h, w), mean_split, var_split,
                           self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        self.running_mean.copy_(mean_split.view(s, c).mean(0))
        self.running_var.copy_(var_split.view(s, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w)
