"""Which rows each optimizer step trains on: a pure function of (seed, step), so resume is exact."""

from __future__ import annotations

import torch

from .config import SFTConfig
from .data import SFTData


class StepSampler:
    """Rows for optimizer step ``s``: epoch ``s // steps_per_epoch`` visits rows in a ``torch.randperm`` order seeded
    with ``seed + epoch``; step ``s`` takes the next ``rows_per_step`` of it (a tail that does not fill a step is
    skipped). Depends only on (seed, s), which makes resume exact and ``k x b`` accumulation see the same rows as
    one batch of ``k*b``.

    ``lengths`` (tokens per row) turns on grouping by length: the epoch's shuffled rows are cut into windows of
    ``GROUP_WINDOW`` steps, each window is sorted by length (longest first) and cut into steps, and the steps of
    the epoch are then visited in a seeded random order. Every row is still seen once per epoch and each step's
    rows still depend only on (seed, s, rows_per_step), but a step's rows have similar lengths, so padding to the
    longest row of a micro-batch wastes little: on the default chatterbot data (mean 59 tokens, max 256) the
    first 80 steps at 8 rows pad to 1.93x the real tokens without grouping and 1.08x with it.
    """

    GROUP_WINDOW = 32  # steps per sorted window: long enough to find similar lengths, short enough to keep mixing

    def __init__(self, n_rows: int, rows_per_step: int, seed: int, lengths: list[int] | None = None):
        if lengths is not None and len(lengths) != n_rows:
            raise ValueError(f"lengths must have one entry per row ({n_rows}), got {len(lengths)}")
        self.n_rows, self.rows_per_step, self.seed, self.lengths = n_rows, rows_per_step, seed, lengths
        self.steps_per_epoch = n_rows // rows_per_step
        self._epoch, self._perm = None, None

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_rows, generator=g).tolist()
        if self.lengths is None:
            return perm
        used = perm[: self.steps_per_epoch * self.rows_per_step]
        window = self.GROUP_WINDOW * self.rows_per_step
        steps = []
        for w0 in range(0, len(used), window):
            chunk = sorted(used[w0 : w0 + window], key=lambda i: -self.lengths[i])  # stable: ties keep shuffle order
            steps += [chunk[j : j + self.rows_per_step] for j in range(0, len(chunk), self.rows_per_step)]
        order = torch.randperm(len(steps), generator=g).tolist()
        return [i for k in order for i in steps[k]]

    def rows(self, step: int) -> tuple[int, list[int]]:
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = self._epoch_order(epoch)
            self._epoch = epoch
        return epoch, self._perm[j * self.rows_per_step : (j + 1) * self.rows_per_step]


def row_lengths(data: SFTData, cfg: SFTConfig) -> list[int] | None:
    """Tokens per training row for ``StepSampler``'s grouping, or None when ``group_by_length`` is off."""
    return [sum(len(ex) for ex in row) for row in data.train_rows] if cfg.group_by_length else None
