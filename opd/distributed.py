"""The processes of a training run: one plain process, or several under `accelerate launch`.

`World` wraps an `accelerate.Accelerator` and offers the few collective operations the trainer
needs, so the recipe reads the same with one process or many:

* `sum`: all-reduce of a number (the GLOBAL kept-token and sequence counts of the loss
  normalisation; the held-out evaluation's counts).
* `gather_rows`: every process's [b, T] rows, concatenated in rank order (rank 0's rows first),
  padded to the longest T: selection ranks positions over the WHOLE rollout batch, so it runs on
  the gathered signals, identically on every rank.
* `backward` / `no_sync`: DDP (or FSDP) averages gradients over processes; the trainer multiplies
  each process's loss by the world size, so the applied gradient is the gradient of the global
  sum over kept tokens / global count: the single-process update, whatever the split.

On a GPU machine, `accelerate launch --config_file configs/accelerate_ddp.yaml` (or
`accelerate_fsdp.yaml` for students that do not fit one GPU) starts one process per GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import Tensor


class World:
    """Rank, size and collectives of the run's processes."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @classmethod
    def create(cls, device: str = "auto") -> World:
        """One Accelerator per process; device "cpu" forces CPU (gloo) even where CUDA exists."""
        return cls(Accelerator(cpu=device == "cpu", mixed_precision="no"))

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def sum(self, value: float | int | Tensor) -> float:
        """Sum of a number over all processes (float64, so integer counts stay exact)."""
        if self.size == 1:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1)
        return float(self.accelerator.reduce(t, reduction="sum")[0])

    def gather_rows(self, x: Tensor) -> Tensor:
        """[b, T, ...] on each process -> [size * b, T_max, ...] on every process (rank order).

        Every process must hold the same b. T is padded with zeros to the longest T.
        """
        if self.size == 1:
            return x
        padded = self.accelerator.pad_across_processes(x.to(self.device), dim=1, pad_index=0)
        return self.accelerator.gather(padded).cpu()

    def local_rows(self, n_global: int) -> slice:
        """This process's contiguous share of n_global rows (n_global divisible by size)."""
        if n_global % self.size:
            raise ValueError(f"batch of {n_global} rows does not split over {self.size} processes")
        share = n_global // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, skip: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce for a micro-batch that is not the last (when `skip`)."""
        if skip and self.size > 1:
            with self.accelerator.no_sync(model):
                yield
        else:
            yield

    def clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Global gradient norm (after DDP's reduction); clips in place when max_norm > 0."""
        params = list(parameters)
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        grads = [p.grad.detach().double().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def release(self) -> None:
        """Drop the Accelerator's references to prepared models and optimizers (between arms)."""
        self.accelerator.free_memory()


def launched_world(device: str = "auto") -> World | None:
    """The World of a multi-process launch (torchrun or accelerate launch set WORLD_SIZE > 1); None in a plain
    process, which then runs exactly as it always has (no Accelerator, no process group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return World.create(device)
