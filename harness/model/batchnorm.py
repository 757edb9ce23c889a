"""SplitBatchNorm: BatchNorm over `num_splits` sub-batches independently (the CIFAR-10 Colab's
single-device stand-in for multi-GPU BN). Sample n falls in split n % num_splits. With one
split it is plain BatchNorm2d."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """Each split keeps its own running estimate (`running_mean_split`, `running_var_split`, one
    entry per split and channel). The Colab repeats the shared estimate into every split before each
    step and averages them back after it; the update is linear, so the mean over the splits' own
    estimates is the same recursion, and it is what `running_mean` / `running_var` hold whenever they
    are read (evaluation mode, a state dict) — without the repeat, average and copy on every call."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits
        if num_splits > 1:
            self.register_buffer("running_mean_split", self.running_mean.repeat(num_splits))
            self.register_buffer("running_var_split", self.running_var.repeat(num_splits))

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        if n % s:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by bn_splits={s}")
        self.num_batches_tracked.add_(1)
        if x.is_contiguous():
            # Splits side by side as channels: sample i*s + j is row i of channel block j, a view.
            out = F.batch_norm(x.view(n // s, s * c, h, w), self.running_mean_split, self.running_var_split,
                               self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        else:
            out = self._strided_splits(x)
        # Not a view for autograd: the next layer's in-place ReLU on a view would make every
        # backward rebuild the base (as_strided, zeros, copy: ~10 ops per layer).
        return torch.ops.aten._unsafe_view(out, (n, c, h, w))

    def _strided_splits(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation for a channels_last (or any other non-contiguous) batch, in its own
        layout: folding the splits into channels would copy it to NCHW and the next convolution back.
        Statistics per (split, channel) reduced over a 5-d view, computed in fp32 as BatchNorm does."""
        n, c, h, w = x.shape
        s = self.num_splits
        xs = x.view(n // s, s, c, h, w)
        var, mean = torch.var_mean(xs.float(), dim=(0, 3, 4), correction=0, keepdim=True)  # (1, s, c, 1, 1)
        scale = self.weight.view(c, 1, 1) * torch.rsqrt(var + self.eps)
        out = torch.addcmul(self.bias.view(c, 1, 1) - mean * scale, xs, scale)
        with torch.no_grad():
            count = (n // s) * h * w
            self.running_mean_split.lerp_(mean.view(-1), self.momentum)
            self.running_var_split.lerp_(var.view(-1) * (count / max(count - 1, 1)), self.momentum)  # unbiased
        return out.to(x.dtype)

    @torch.no_grad()
    def _average_splits(self) -> None:
        if self.num_splits > 1:
            c = self.num_features
            self.running_mean.copy_(self.running_mean_split.view(self.num_splits, c).mean(0))
            self.running_var.copy_(self.running_var_split.view(self.num_splits, c).mean(0))

    def train(self, mode: bool = True):
        if not mode:  # evaluation normalises with the shared estimate: the splits' mean, now
            self._average_splits()
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._average_splits()  # a checkpoint's running_mean/var are the splits' mean, as the Colab's
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Older format: checkpoints written before the per-split estimates (issue 34) hold the shared one
        # alone; every split starts from it, as the Colab's next step would. Can go with those checkpoints.
        if self.num_splits > 1 and prefix + "running_mean" in state_dict and prefix + "running_mean_split" not in state_dict:
            state_dict[prefix + "running_mean_split"] = state_dict[prefix + "running_mean"].repeat(self.num_splits)
            state_dict[prefix + "running_var_split"] = state_dict[prefix + "running_var"].repeat(self.num_splits)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
