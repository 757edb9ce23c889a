"""The epoch's order and each rank's share of a step (harness.data.spec), which every view source
(in memory, classic per-image, image folders) takes from one place."""
import torch

from harness.data.datasets import InMemoryViews, LoaderViews
from harness.data.spec import EpochBatches, epoch_order
from harness.run.config import make_config


def test_the_ranks_shares_of_a_step_are_its_global_batch_in_the_epochs_order():
    """Two DDP ranks read disjoint halves of each step's global batch (batch 8: 4 each), together
    exactly the step's 8 images of the epoch's permutation; a resumed epoch starts at its step."""
    order = epoch_order(42, 3, 1).tolist()
    ranks = [EpochBatches(42, 8, rank, 2, 3) for rank in (0, 1)]
    assert ranks[0].steps_per_epoch == 5  # drop_last
    for step in range(5):
        shares = [[i for _, i in r.keys(1, step)] for r in ranks]
        assert len(shares[0]) == len(shares[1]) == 4 and not set(shares[0]) & set(shares[1])
        assert shares[0] + shares[1] == order[step * 8:(step + 1) * 8]
    ranks[1].set_epoch(1, 3)
    assert [[i for _, i in keys] for keys in ranks[1]] == [order[28:32], order[36:40]]


def test_in_memory_and_per_image_sources_give_a_rank_the_same_images():
    cfg = make_config("fmnist-tiny", ["optim.batch_size=8"])
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    for rank in (0, 1):
        memory = InMemoryViews(images, cfg, torch.device("cpu"), rank, 2)
        classic = LoaderViews(cfg, torch.device("cpu"), rank, 2, images=images)
        for step in range(memory.steps_per_epoch):
            assert torch.equal(memory.batch_at(2, step)[2], classic.batch_at(2, step)[2])
