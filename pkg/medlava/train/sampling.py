"""Each rank's sample order for an epoch, by hand because DistributedSampler can neither start mid-epoch (exact
resume) nor group by length. Shared by every training loop."""

from __future__ import annotations

import torch

from medlava.distributed import Dist


def rank_share(order: list[int], dist: Dist) -> list[int]:
    """This rank's strided share of an epoch's order, padded to equal shards as DistributedSampler pads."""
    order = order + order[: (-len(order)) % dist.world_size]
    return order[dist.rank :: dist.world_size]


def epoch_indices(
    n: int, seed: int, epoch: int, dist: Dist, skip: int, batch_size: int, lengths: list[int] | None = None
) -> list[int]:
    """This rank's sample order for an epoch, from `skip` on.

    With `lengths`, batches are length-grouped as HF's group_by_length: a random permutation is cut into
    megabatches of 50 global batches, each sorted by length, so a batch holds samples of similar length
    (less padding) while batch order stays random."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return rank_share(order, dist)[skip:]
    order += order[: (-len(order)) % dist.world_size]  # equal shards, as DistributedSampler pads
    global_batch = batch_size * dist.world_size
    mega = global_batch * 50
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    # Only the very last batch can be short; it stays last so every rank's batches stay aligned.
    full = len(batches) - (len(batches[-1]) < global_batch)
    perm = torch.randperm(full, generator=g).tolist() + list(range(full, len(batches)))
    return [j for b in perm for j in batches[b][dist.rank :: dist.world_size]][skip:]
