"""Running as one rank of a ``torchrun`` job: the process group, DDP, and the few collectives the jobs need.

``torchrun --nproc-per-node N -m SALTSegmentLib.cli train ...`` starts N
copies of the CLI with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address in their environment (on several machines, ``--nnodes``
and ``--rdzv-endpoint`` do the same: that part is torchrun's). Each copy
finds itself here (:meth:`Distributed.from_environment`); without torchrun
(or with one process) there is no :class:`Distributed` and the jobs run as
before.

- Training: every rank builds the same bank and draws the same global batch,
  computes its own rows, and DistributedDataParallel averages the gradients
  (:mod:`training`); rank 0 alone writes the adapter and reports progress;
  a stop asked on any rank (SIGTERM, the stop file) stops every rank at the
  same step (:meth:`Distributed.any`, polled between steps).
- Batch propagation: the volumes are shared out by position
  (:meth:`Distributed.share`), each rank writes its own, and rank 0 gathers
  every status into the summary (:mod:`batch_propagation`).

NCCL connects the ranks when they run on CUDA GPUs (one GPU per local rank),
gloo when they run on CPUs.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from .devices import resolve_device

T = TypeVar("T")


@dataclass
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str = "gloo"

    @classmethod
    def from_environment(cls, device_choice: str = "auto",
                         environment: Optional[dict[str, str]] = None) -> Optional["Distributed"]:
        """The job torchrun started this process in, or None (no torchrun, or a single process)."""
        environment = os.environ if environment is None else environment
        world_size = int(environment.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return None
        rank = int(environment["RANK"])
        local_rank = int(environment.get("LOCAL_RANK", rank))
        backend = "nccl" if resolve_device(device_choice).type == "cuda" else "gloo"
        return cls(rank, world_size, local_rank, backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, timeout_s: float = 1800.0) -> None:
        """Join the process group (torchrun's rendezvous, read from the environment)."""
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=_dt.timedelta(seconds=timeout_s))

    def close(self, together: bool = True) -> None:
        """Leave the process group; ``together``: first wait until every rank is done (a clean end).

        A rank that left while another still used the group (rank 0 saving
        the adapter) could make gloo abort that one. After an error the
        other ranks may never arrive, so only clean ends wait (at most 5 minutes).
        """
        if not dist.is_initialized():
            return
        if together:
            try:
                if self.backend == "gloo":
                    dist.monitored_barrier(timeout=_dt.timedelta(seconds=300))
                else:
                    dist.barrier()
            except RuntimeError:
                pass  # another rank is gone: there is nothing left to wait for
        dist.destroy_process_group()

    def device(self, choice: str) -> torch.device:
        """The device of this rank: its own GPU (LOCAL_RANK) on CUDA, else what ``choice`` resolves to."""
        resolved = resolve_device(choice)
        if resolved.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return resolved

    @property
    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel around ``module``: parameters broadcast from rank 0, gradients averaged.

        ``find_unused_parameters``: a step may leave some trainable tensors
        out of the loss (the decoder's IoU head, a segment's tokens), which
        plain DDP would wait for forever.
        """
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # The frozen model's buffers are the same on every rank: no need to send them at every step.
        parameters = inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else \
            {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True, **buffers)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks."""
        total = value.detach().to(self._collective_device, torch.float64).clone()
        dist.all_reduce(total)
        return (total / self.world_size).to(value.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (every rank must call it at the same point)."""
        value = torch.tensor([1 if flag else 0], device=self._collective_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def share(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items, with their positions: item i goes to rank i mod world size."""
        return [(index, item) for index, item in enumerate(items) if index % self.world_size == self.rank]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered
