"""The order an epoch visits the training images in: one seeded draw shared by every rank, each rank's
share of every global batch, the steps a resumed run already took skipped, and airbench's alternating
flip. Everything is seeded by (seed, epoch, stream), so a resumed run sees what an uninterrupted one did."""

from __future__ import annotations

import torch

from imgcls.data import Split, shards
from imgcls.training import distributed
from imgcls.training.context import TrainingContext
from imgcls.training.imbalance import epoch_order


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7 + stream) % 2**63


def epoch_batches(ctx: TrainingContext, train: Split, done_steps: int, epoch: int, aug_gen: torch.Generator,
                  images: bool = True):
    """This rank's remaining batches of `epoch` from `train` (images, or cached features when not `images`):
    one seeded order shared by every rank (a permutation, or a class-rebalancing draw with --sampler), each
    rank taking its share of every global batch, skipping the `done_steps` a resumed run already took."""
    cfg, world = ctx.cfg, ctx.world
    if train.shards is not None:  # shards are read a chunk at a time, each rank its own range (data/shards.py)
        if done_steps == 0:
            aug_gen.manual_seed(stream_seed(ctx.rank_seed, epoch, 1))
        local_batch = cfg.batch_size // world.size
        chunks = shards.epoch_chunks(train.shards, stream_seed(cfg.seed, epoch, 0), world.rank, world.size,
                                     done_steps * local_batch)
        return shards.chunk_batches(train.shards, chunks, train.labels, local_batch, train.workers)
    order = epoch_order(cfg.sampler, ctx.dataset.train.labels, torch.Generator().manual_seed(
        stream_seed(cfg.seed, epoch, 0)))[: ctx.steps_per_epoch * cfg.batch_size]
    if done_steps == 0:
        aug_gen.manual_seed(stream_seed(ctx.rank_seed, epoch, 1))
    local_batch = cfg.batch_size // world.size
    mine = distributed.rank_order(order, cfg.batch_size, world)[done_steps * local_batch :]
    batches = train.batches(mine, local_batch, seed=stream_seed(ctx.rank_seed, epoch, 2),
                                   first=done_steps * local_batch)
    if cfg.alt_flip and images:
        return alternating_flips(batches, mine, local_batch, len(train), cfg.seed, epoch)
    return batches


def alternating_flips(batches, order: torch.Tensor, batch_size: int, n: int, seed: int, epoch: int):
    """airbench's alternating flip: image i is mirrored in epoch e when (its coin, drawn once from the run's
    seed) XOR (e is odd). Each image is thus seen both ways in turn rather than at random. `order` lists
    the images `batches` yields, in order."""
    coins = torch.rand(n, generator=torch.Generator().manual_seed(stream_seed(seed, 0, 3))) < 0.5
    for k, (images, labels) in enumerate(batches):
        flip = coins[order[k * batch_size : (k + 1) * batch_size]] ^ (epoch % 2 == 1)
        yield torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images), labels
