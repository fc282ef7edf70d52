"""``propagate --cases``: many volumes with one adapter, shared out across torchrun ranks, resumable.

Each volume of the case list gets one output in the folder,
``<name>.seg.nrrd``, written atomically by :func:`pipeline.run_propagation`
(so a volume's output either exists complete or not at all). Volume i
belongs to rank i mod the number of ranks, so each is written exactly once.
A volume whose output already exists and describes the volume's grid is
skipped: after a crash, a rerun does only what is missing. Rank 0 gathers
every rank's statuses and writes ``summary.csv`` and ``summary.json`` (every
volume: written, skipped, failed with its error, stopped, or not run).

Each rank loads the adapter once and merges it, so a volume costs only its
propagation.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .case_list import CaseEntry
from .propagation import PropagationConfig, PropagationProgress
from .worker_protocol import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK

if TYPE_CHECKING:
    from .distributed import Distributed

OUTPUT_SUFFIX = ".seg.nrrd"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
STATUSES = ("written", "skipped", "failed", "stopped", "not run")


class BatchInputError(ValueError):
    """The case list cannot be propagated into the folder (names clash, the folder is a file, ...)."""


@dataclass
class BatchJob:
    cases: list[CaseEntry]
    adapter: str
    folder: str
    weights: Optional[str] = None
    resample_labels: bool = False
    match_by: str = "auto"
    config: PropagationConfig = field(default_factory=PropagationConfig)
    mode_given: bool = False     # False: box for volumes with labels, auto for the others

    def output_for(self, entry: CaseEntry) -> Path:
        return Path(self.folder) / f"{entry.name}{OUTPUT_SUFFIX}"


@dataclass
class VolumeStatus:
    """What happened to one volume of the list."""

    name: str
    image: str
    output: str
    status: str           # one of STATUSES
    rank: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class BatchSummary:
    folder: Path
    volumes: list[VolumeStatus]
    summary_path: Optional[Path] = None

    def count(self, status: str) -> int:
        return sum(v.status == status for v in self.volumes)

    @property
    def exit_code(self) -> int:
        if self.count("failed"):
            return EXIT_ERROR
        if self.count("stopped") or self.count("not run"):
            return EXIT_INTERRUPTED
        return EXIT_OK

    def describe(self) -> str:
        counts = [f"{self.count(s)} {s}" for s in STATUSES if self.count(s)]
        return f"{len(self.volumes)} volumes: " + ", ".join(counts)

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "counts": {s: self.count(s) for s in STATUSES},
                "volumes": [asdict(v) for v in self.volumes]}

    def table(self) -> str:
        width = max([len(v.name) for v in self.volumes] + [6])
        lines = [f"{'volume':<{width}}  {'status':<8} rank  seconds  message"]
        lines += [f"{v.name:<{width}}  {v.status:<8} {v.rank:>4}  {v.seconds:>7.1f}  {v.message}"
                  for v in self.volumes]
        return "\n".join(lines)

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "image", "output", "status", "rank", "seconds", "message"])
        for v in self.volumes:
            writer.writerow([v.name, v.image, v.output, v.status, v.rank, f"{v.seconds:.1f}", v.message])
        return buffer.getvalue()


def output_is_complete(output: Path, image: str) -> bool:
    """Whether ``output`` is a finished label map of ``image``'s grid (atomic writes leave no partial file)."""
    from .volume_io import read_volume_info

    if not output.is_file():
        return False
    try:
        written = read_volume_info(output)
        source = read_volume_info(image)
    except Exception:  # an unreadable header is not a finished output: propagate again
        return False
    if written is None:
        return False
    return source is None or tuple(written.size) == tuple(source.size)


def check_batch(job: BatchJob) -> None:
    """Refuse a list whose outputs would collide, or a folder that cannot be one."""
    folder = Path(job.folder)
    if folder.exists() and not folder.is_dir():
        raise BatchInputError(f"--out {folder} is a file; with --cases, --out is a folder for the outputs")
    seen: dict[str, int] = {}
    for entry in job.cases:
        if entry.name in seen:
            raise BatchInputError(f"Lines {seen[entry.name]} and {entry.line} of the case list both write "
                                  f"{entry.name}{OUTPUT_SUFFIX}; give them different names (a 'name' column)")
        seen[entry.name] = entry.line


def run_batch_propagation(job: BatchJob, distributed: Optional["Distributed"] = None,
                          should_stop: Optional[Callable[[], bool]] = None,
                          on_message: Optional[Callable[[str], None]] = None,
                          on_ready: Optional[Callable[[int], None]] = None,
                          on_volume: Optional[Callable[[PropagationProgress], None]] = None) -> BatchSummary:
    """Propagate this rank's share of the list; rank 0 writes the summary of every volume.

    ``on_ready(n)`` is called with this rank's number of volumes once the
    adapter is loaded; ``on_volume`` after each of them.
    """
    from dataclasses import replace

    from .adapter_file import load_adapter, load_adapter_metadata
    from .adapters import merge_adapters
    from .atomic_files import atomic_path
    from .pipeline import PropagateJob, run_propagation

    say = on_message or (lambda text: None)
    check_batch(job)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = distributed.rank if distributed is not None else 0
    mine = distributed.share(job.cases) if distributed is not None else list(enumerate(job.cases))
    load_adapter_metadata(job.adapter)          # a bad adapter is refused before any volume is read
    statuses: list[tuple[int, VolumeStatus]] = []
    pending = []
    for index, entry in mine:
        output = job.output_for(entry)
        if output_is_complete(output, entry.image):
            statuses.append((index, VolumeStatus(entry.name, entry.image, str(output), "skipped", rank,
                                                 message="output exists")))
        else:
            pending.append((index, entry, output))
    loaded = None
    if pending:
        loaded = load_adapter(job.adapter, weights=job.weights)
        merge_adapters(loaded.model)   # plain weights again: propagation pays nothing for the adapter
    if on_ready is not None:
        on_ready(len(mine))
    start = time.perf_counter()
    stopped = False
    for done, (index, entry, output) in enumerate(pending, start=1):
        status = VolumeStatus(entry.name, entry.image, str(output), "not run", rank)
        if not stopped and should_stop is not None and should_stop():
            stopped = True
        if stopped:
            status.message = "stopped before it started"
            statuses.append((index, status))
            continue
        mode = job.config.mode if job.mode_given else ("box" if entry.labels else "auto")
        volume_job = PropagateJob(image=entry.image, adapter=job.adapter, out=str(output), labels=entry.labels,
                                  weights=job.weights, resample_labels=job.resample_labels, match_by=job.match_by,
                                  config=replace(job.config, mode=mode), absent=entry.absent)
        began = time.perf_counter()
        try:
            outcome = run_propagation(volume_job, loaded, should_stop=should_stop)
        except Exception as error:  # one bad volume does not end the batch; the summary names its error
            status.status, status.message = "failed", _one_line(error)
        else:
            if outcome.result.interrupted:
                stopped = True
                status.status, status.message = "stopped", "stopped during propagation; nothing written"
            else:
                status.status = "written"
                status.message = f"{mode} mode, {len(outcome.result.slices)} slices"
        status.seconds = round(time.perf_counter() - began, 1)
        statuses.append((index, status))
        say(f"{entry.name}: {status.status}" + (f" ({status.message})" if status.message else ""))
        if on_volume is not None:
            elapsed = time.perf_counter() - start
            on_volume(PropagationProgress(done, len(pending), elapsed, elapsed / done * (len(pending) - done)))
    gathered = distributed.gather(statuses) if distributed is not None else [statuses]
    volumes = [status for _, status in sorted((item for part in gathered for item in part), key=lambda x: x[0])]
    summary = BatchSummary(folder, volumes)
    if distributed is None or distributed.is_main:
        summary.summary_path = folder / SUMMARY_CSV
        with atomic_path(folder / SUMMARY_JSON) as temporary:
            temporary.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        with atomic_path(summary.summary_path) as temporary:
            temporary.write_text(summary.csv_text())
    return summary


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
