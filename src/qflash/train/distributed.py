"""Several processes (torchrun / accelerate launch): who I am, how a step's samples are split, sums.

The step is the unit that does not change with the number of processes: optimizer step k consumes
the same samples (train.micro_batch_size * train.grad_accum of them, the global batch) whether one
process or eight run it; process r takes every N-th of them. So the loss and the data position are
the same for any N, and a checkpoint written with N processes resumes with M.

The loss is token-weighted over the whole global batch: each process divides its summed token
losses by the global count of trained tokens (an all-reduce), and DDP averages gradients over the N
processes, so each process scales its loss by N. Processes may get different numbers of packed
micro-batches; they all run the largest count (zero-weighted repeats) so DDP's gradient
synchronisation, which happens on the last micro-batch, stays in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from qflash.data.batching import Batch


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    accelerator: object | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _reduce(self, value: float, op) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=op)
        return float(t.item())

    def sum(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.SUM if self.distributed else None)

    def max(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.MAX if self.distributed else None)

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def shard(self, ids: list[int]) -> list[int]:
        """This process's share of a step's samples: every world-th one, starting at rank."""
        return ids[self.rank :: self.world]


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(cpu: bool):
    from accelerate import Accelerator

    # Mixed precision is qflash's own (autocast around the loss); Accelerate only places and wraps.
    return Accelerator(cpu=cpu, mixed_precision="no")


def ranks_of(accelerator) -> Ranks:
    return Ranks(accelerator.process_index, accelerator.num_processes, accelerator)


class LossModule(torch.nn.Module):
    """The model plus qflash's loss as one module, so DDP's forward (and its gradient sync) wraps both."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch_fields) -> torch.Tensor:
        from qflash.train.loss import loss_sum

        return loss_sum(self.model, Batch(**batch_fields))


def batch_fields(batch: Batch) -> dict:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}
