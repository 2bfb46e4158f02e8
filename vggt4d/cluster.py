"""Slurm jobs that fit the cluster and a wait that ends (``hydra/launcher=slurm``).

Before submitting, ``sinfo`` tells which partitions exist, their nodes' CPUs, memory, GPUs
(GRES) and time limits: :func:`plan_request` turns ``cluster.*`` (null = automatic) and the
jobs' configs into one request per array task, or refuses in one line when no node could ever
run it. While waiting, :func:`watch` follows the array with ``squeue`` and the jobs' result
files: tasks pending for a reason that cannot clear are cancelled, tasks that leave the queue
without a result are reported, so a sweep always ends. ``sacct`` is used only when Slurm
accounting exists (one notice otherwise).
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vggt4d.config.cluster import ClusterConfig
from vggt4d.errors import UserError

log = logging.getLogger(__name__)

GIB = 1024**3
MAX_AUTO_CPUS = 8
"""Automatic CPUs per job stop here: DA3's CPU forward gains little beyond it."""
MIN_MEM_GB = 2
"""Automatic memory never goes below this (Python, torch and DA3 alone take about 0.5 GiB)."""
MEMORY_HEADROOM = 1.25
"""Automatic memory = estimate × this: arrays of the stages after the forward."""
DEFAULT_MEM_GB = 8
"""Automatic memory when no job's clip can be read before it runs (e.g. a missing path: that
job then fails with the reason itself)."""

STUCK_REASONS = {
    "PartitionConfig": "the request exceeds what the partition allows",
    "PartitionNodeLimit": "the request needs more nodes than the partition allows",
    "PartitionTimeLimit": "the time limit exceeds the partition's",
    "ReqNodeNotAvail": "the nodes the job needs are not available",
    "BadConstraints": "no node has the requested features",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "DependencyNeverSatisfied": "a job it depends on failed",
}
"""Pending reasons (``squeue %r``) that no amount of waiting clears, with what they mean."""
STUCK_GRACE_S = {"ReqNodeNotAvail": 60.0}
"""Seconds a stuck reason must last before the task is cancelled: the nodes a job needs may be
back after a reboot; every other reason in :data:`STUCK_REASONS` is final when first seen."""
UNAVAILABLE_STATES = ("down", "drain", "fail", "maint", "future", "inval")
"""Node states (``sinfo %T`` prefixes) in which a node takes no new job; a trailing ``*``
marks a node that does not respond."""
RESULT_GRACE_S = 15.0
"""How long a result file may take to appear after its task left the queue (shared file
systems are slow to show new files)."""


@dataclass(frozen=True)
class Node:
    """One node of one partition as ``sinfo --Node`` lists it."""

    partition: str
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    state: str
    max_time_min: int | None
    """The partition's time limit; None = unlimited."""
    default: bool = False
    """The cluster's default partition (``*`` after its name)."""


SINFO_FORMAT = "%P|%N|%c|%m|%G|%T|%l"
SQUEUE_FORMAT = "%i|%T|%r"


def parse_gres(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:a100:4(S:0-1),gpu:2`` → 6; ``(null)`` → 0."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_time_limit(text: str) -> int | None:
    """Minutes of a Slurm time limit (``[days-]hours:minutes:seconds``, ``minutes:seconds``,
    ``minutes``); ``infinite`` / ``UNLIMITED`` → None. Seconds round up."""
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    seconds = {1: lambda: parts[0] * 60, 2: lambda: parts[0] * 60 + parts[1],
               3: lambda: (parts[0] * 60 + parts[1]) * 60 + parts[2]}[len(parts)]()
    return int(days or 0) * 24 * 60 + math.ceil(seconds / 60)


def parse_sinfo(text: str) -> list[Node]:
    """Lines of ``sinfo --noheader --Node --format=%P|%N|%c|%m|%G|%T|%l``."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        partition, name, cpus, memory, gres, state, limit = line.split("|")
        nodes.append(Node(partition=partition.rstrip("*"), name=name, cpus=int(cpus),
                          memory_mb=int(memory.rstrip("+")), gpus=parse_gres(gres),
                          state=state, max_time_min=parse_time_limit(limit),
                          default=partition.endswith("*")))
    return nodes


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """Task id → (state, reason) from ``squeue --noheader --array --format=%i|%T|%r``."""
    entries = {}
    for line in text.splitlines():
        if line.strip():
            task, state, reason = line.split("|", 2)
            entries[task] = (state, reason)
    return entries


def stuck_reason(reason: str) -> str | None:
    """What a pending reason that cannot clear means; None for reasons that clear by waiting
    (Resources, Priority, ...). ``ReqNodeNotAvail, UnavailableNodes:n1`` matches by its head."""
    return STUCK_REASONS.get(reason.split(",")[0].strip())


@dataclass(frozen=True)
class JobNeeds:
    """What one job's config asks of a node: its device setting and the memory it needs on
    the host with and without CUDA (None: not known before it runs)."""

    device: str
    cpu_bytes: int | None
    cuda_bytes: int | None
    adapts: bool = False
    """The job fits its forwards to the memory it finds (``chunk.auto``)."""


@dataclass(frozen=True)
class Request:
    """Resources of every task of one array (``sbatch`` options)."""

    partition: str | None
    """None: submit without ``--partition`` (the cluster's default)."""
    partition_name: str
    gpus: int
    cpus: int
    mem_gb: int
    time_min: int

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU(s)" if self.gpus else "no GPU"
        return (f"partition {self.partition_name}: {gpus}, {self.cpus} CPU(s), {self.mem_gb} GB, "
                f"{self.time_min} min per job")


def forward_frames(run: object) -> int | None:
    """Frames of the largest DA3 forward a validated job will run: the clip's (read from its
    metadata by :func:`vggt4d.frames.probe_clip`), or ``chunk.length`` when shorter; None when
    the source cannot be read before the job runs (the job then fails with the reason)."""
    from vggt4d.frames import probe_clip

    try:
        frames = probe_clip(run.data, run.process_res).num_frames
    except UserError:
        return None
    return min(frames, run.chunk.length) if run.chunk.length > 0 else frames


def job_needs(run: object) -> JobNeeds:
    """Device and host memory of one validated job (:class:`vggt4d.config.RunConfig`).

    On CPU the host holds the whole forward (:func:`vggt4d.resources.estimate_forward_memory`
    for the largest forward, fp32 unless ``dtype`` says otherwise; at most ``memory_limit_gb``,
    beyond which the job refuses or chunks); with CUDA it holds the weights twice while they
    load, the runtime and the captured statistics. ``chunk.auto`` jobs fit their chunks to
    the memory they find, so their need may be capped at a node's.
    """
    import torch

    from vggt4d.frames import probe_clip
    from vggt4d.model import memory_arguments
    from vggt4d.resources import DTYPE_OF, RUNTIME_OVERHEAD_BYTES, estimate_forward_memory

    device, frames = str(run.device), forward_frames(run)
    if frames is None:
        return JobNeeds(device, None, None)
    height, width = probe_clip(run.data, run.process_res).size
    estimate = estimate_forward_memory(
        **memory_arguments(run.model), frames=frames, height=height, width=width,
        dtype=DTYPE_OF.get(str(run.dtype), torch.float32))
    cpu = estimate.total
    if run.memory_limit_gb:
        cpu = min(cpu, int(run.memory_limit_gb * GIB))
    return JobNeeds(device, cpu, 2 * estimate.weights + RUNTIME_OVERHEAD_BYTES
                    + estimate.captured, adapts=bool(run.chunk.auto))


def partition_nodes(cluster: ClusterConfig, nodes: Sequence[Node]) -> tuple[str, list[Node]]:
    """The partition's name and nodes: ``cluster.partition``, or the default one when null."""
    names = sorted({node.partition for node in nodes})
    listed = ", ".join(names)
    if cluster.partition is None:
        default = [node for node in nodes if node.default]
        if not default:
            raise UserError(f"this Slurm cluster has no default partition; set "
                            f"cluster.partition=<one of {listed}>")
        return default[0].partition, default
    chosen = [node for node in nodes if node.partition == cluster.partition]
    if not chosen:
        raise UserError(f"cluster.partition={cluster.partition}: no such Slurm partition "
                        f"(sinfo lists {listed}); set cluster.partition=<one of them> or null "
                        f"for the default partition")
    return cluster.partition, chosen


def node_available(node: Node) -> bool:
    """Whether the node takes new jobs (responding, not down, drained, failed or reserved for
    maintenance)."""
    return not node.state.endswith("*") and not node.state.lower().startswith(UNAVAILABLE_STATES)


def uses_cuda(device: str, partition_gpus: int, gpus_per_job: int | None) -> bool:
    """Whether a job with this ``device`` setting runs on CUDA in the partition."""
    if device == "auto":
        return partition_gpus > 0 and gpus_per_job != 0
    return device.startswith("cuda")


def plan_gpus(cluster: ClusterConfig, jobs: Sequence[JobNeeds], name: str,
              partition_gpus: int) -> int:
    """GPUs per task: only when a job will use CUDA; ``null`` = 1 then."""
    cuda = [uses_cuda(job.device, partition_gpus, cluster.gpus_per_job) for job in jobs]
    explicit_cuda = [job.device for job in jobs if job.device.startswith("cuda")]
    if explicit_cuda and partition_gpus == 0:
        raise UserError(f"device={explicit_cuda[0]} but partition {name} has no GPUs; use "
                        f"device=auto or device=cpu, or a partition with GPUs")
    if not any(cuda):
        if cluster.gpus_per_job:
            why = (f"partition {name} has no GPUs" if partition_gpus == 0
                   else "the jobs run on CPU (device=cpu)")
            raise UserError(f"cluster.gpus_per_job={cluster.gpus_per_job} but {why}; set "
                            f"cluster.gpus_per_job=null (automatic) or 0")
        return 0
    return 1 if cluster.gpus_per_job is None else cluster.gpus_per_job


def plan_memory(cluster: ClusterConfig, jobs: Sequence[JobNeeds], gpus: int,
                largest_mb: int, name: str) -> int:
    """GB per task: ``cluster.mem_gb``, or the largest job's need × headroom."""
    if cluster.mem_gb is not None:
        return cluster.mem_gb
    node_gb = max(1, largest_mb // 1024)
    needs = [(job.cuda_bytes if gpus else job.cpu_bytes, job.adapts) for job in jobs]
    known = [(need, adapts) for need, adapts in needs if need is not None]
    if not known:
        return min(DEFAULT_MEM_GB, node_gb)
    mem_gb = max(MIN_MEM_GB, math.ceil(max(need for need, _ in known) * MEMORY_HEADROOM / GIB))
    if mem_gb > node_gb and all(adapts for _, adapts in known):
        log.info("jobs would need about %d GB for their whole clip; chunk.auto fits their "
                 "chunks into the %d GB of a node of partition %s", mem_gb, node_gb, name)
        return node_gb
    if mem_gb * 1024 > largest_mb:
        raise UserError(f"each job needs about {mem_gb} GB (memory estimate of the largest clip "
                        f"and model) but the largest node of partition {name} has "
                        f"{largest_mb / 1024:.1f} GB; lower data.max_frames or process_res, "
                        f"split the clip (chunk.length, chunk.auto), choose a smaller model, or "
                        f"set cluster.mem_gb")
    return mem_gb


def plan_request(cluster: ClusterConfig, jobs: Sequence[JobNeeds],
                 nodes: Sequence[Node]) -> Request:
    """One request for every task of the array, checked against the partition's nodes.

    GPUs only when a job uses CUDA; CPUs (null) = the fewest CPUs among nodes with enough GPUs
    divided by the tasks running at once (``array_parallelism``, jobs, GPUs per node), within
    [1, 8]; memory (null) = :func:`plan_memory`. Refuses (``UserError``) when no node of the
    partition can hold the request or the time limit exceeds the partition's.
    """
    cluster.check()
    name, members = partition_nodes(cluster, nodes)
    gpus = plan_gpus(cluster, jobs, name, max(node.gpus for node in members))
    able = [node for node in members if node.gpus >= gpus] or members
    cpus = cluster.cpus_per_job
    if cpus is None:
        at_once = min(len(jobs), cluster.array_parallelism)
        if gpus:
            at_once = min(at_once, max(1, min(node.gpus for node in able) // gpus))
        cpus = max(1, min(MAX_AUTO_CPUS, min(node.cpus for node in able) // at_once))
    mem_gb = plan_memory(cluster, jobs, gpus, max(node.memory_mb for node in members), name)
    request = Request(partition=cluster.partition, partition_name=name, gpus=gpus, cpus=cpus,
                      mem_gb=mem_gb, time_min=cluster.time_limit_min)
    fits = [node for node in members if node.gpus >= gpus and node.cpus >= cpus
            and node.memory_mb >= mem_gb * 1024]
    if not fits:
        largest = max(members, key=lambda node: (node.gpus, node.cpus, node.memory_mb))
        raise UserError(
            f"the Slurm request ({request.describe()}) fits no node of partition {name} "
            f"(largest: {largest.gpus} GPU(s), {largest.cpus} CPU(s), "
            f"{largest.memory_mb / 1024:.1f} GB); lower cluster.gpus_per_job, "
            f"cluster.cpus_per_job or cluster.mem_gb (null = automatic)")
    if not any(node_available(node) for node in fits):
        log.warning("no node of partition %s that can hold the jobs is up now (%s); they will "
                    "wait until one is", name,
                    ", ".join(sorted({f"{node.name}: {node.state}" for node in fits})))
    limit = members[0].max_time_min
    if limit is not None and cluster.time_limit_min > limit:
        raise UserError(f"cluster.time_limit_min={cluster.time_limit_min} exceeds partition "
                        f"{name}'s limit of {limit} min")
    return request


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def run_command(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


@dataclass
class Slurm:
    """The Slurm commands the launcher uses; ``run`` executes one command (tests pass a fake)."""

    run: Runner = run_command
    accounting: bool | None = None
    """Whether ``sacct`` works here; None until first asked."""

    def _call(self, command: list[str]) -> subprocess.CompletedProcess:
        try:
            return self.run(command)
        except FileNotFoundError:
            raise UserError(f"hydra/launcher=slurm needs Slurm's {command[0]}, which is not "
                            f"on PATH; run on a Slurm login node or use hydra/launcher=local"
                            ) from None

    def nodes(self) -> list[Node]:
        done = self._call(["sinfo", "--noheader", "--Node", f"--format={SINFO_FORMAT}"])
        if done.returncode != 0:
            raise UserError(f"sinfo failed: {first_line(done.stderr)}")
        nodes = parse_sinfo(done.stdout)
        if not nodes:
            raise UserError("sinfo lists no nodes: this Slurm cluster has nothing to run on")
        return nodes

    def queue(self, array_id: str) -> dict[str, tuple[str, str]] | None:
        """Tasks of the array still in the queue; None when squeue could not say."""
        done = self._call(["squeue", "--noheader", "--array", f"--jobs={array_id}",
                           f"--format={SQUEUE_FORMAT}"])
        if done.returncode == 0:
            return parse_squeue(done.stdout)
        if "Invalid job id" in done.stderr:  # every task has left the queue and was purged
            return {}
        log.warning("squeue failed (%s); trying again", first_line(done.stderr))
        return None

    def cancel(self, task_ids: Sequence[str]) -> None:
        self._call(["scancel", *task_ids])

    def check_accounting(self) -> bool:
        """Whether ``sacct`` answers; without it one notice is logged, once."""
        if self.accounting is None:
            try:
                done = self.run(["sacct", "--noheader", "--allocations", "--jobs=1"])
                reason = None if done.returncode == 0 else first_line(done.stderr + done.stdout)
            except FileNotFoundError:
                reason = "sacct is not installed"
            self.accounting = reason is None
            if reason is not None:
                log.info("Slurm accounting is not available here (%s): jobs are followed "
                         "with squeue and their result files", reason)
        return self.accounting

    def final_state(self, task_id: str) -> str:
        """Final state of a task that left the queue, from accounting when there is some."""
        if not self.check_accounting():
            return "state unknown without accounting"
        done = self._call(["sacct", "--noheader", "--allocations", "--parsable2",
                           f"--jobs={task_id}", "--format=State"])
        states = done.stdout.split()
        return f"state {states[0]}" if done.returncode == 0 and states else "state unknown"


@dataclass
class Task:
    """One array task being waited for: its id, the file its result appears in, the job
    number and the log that tells what happened."""

    task_id: str
    result: Path
    num: int
    log_path: Path
    state: str = ""
    stuck_since: float | None = None
    gone_since: float | None = None
    failure: str | None = field(default=None)


def query_interval(waited_s: float) -> float:
    """Seconds between two ``squeue`` calls: 2 s at first, slower for long waits (≤ 30 s)."""
    return min(30.0, max(2.0, waited_s / 8))


def watch(tasks: Sequence[Task], slurm: Slurm, *, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep, poll_s: float = 1.0) -> None:
    """Wait until every task has a result file or a ``failure`` (set on the task).

    Result files are checked every ``poll_s``, the queue every :func:`query_interval`: a task
    pending for a reason in :data:`STUCK_REASONS` (for :data:`STUCK_GRACE_S`) is cancelled, one
    that left the queue without a result for :data:`RESULT_GRACE_S` is failed with its final
    state (from accounting when there is some) and its log path. State changes are logged.
    """
    if not tasks:
        return
    array_id = tasks[0].task_id.split("_")[0]
    slurm.check_accounting()
    start = clock()
    next_query = start
    while True:
        waiting = [task for task in tasks if task.failure is None and not task.result.exists()]
        if not waiting:
            return
        now = clock()
        if now >= next_query:
            queue = slurm.queue(array_id)
            if queue is not None:
                follow_queue(waiting, queue, slurm, now)
            next_query = now + query_interval(now - start)
        sleep(poll_s)


def follow_queue(waiting: Sequence[Task], queue: dict[str, tuple[str, str]], slurm: Slurm,
                 now: float) -> None:
    """Update the waiting tasks from one ``squeue`` answer (see :func:`watch`)."""
    stuck = []
    for task in waiting:
        if task.task_id not in queue:
            task.gone_since = task.gone_since if task.gone_since is not None else now
            if now - task.gone_since >= RESULT_GRACE_S and not task.result.exists():
                task.failure = (f"Slurm job {task.task_id} ended without a result "
                                f"({slurm.final_state(task.task_id)}); see {task.log_path}")
            continue
        state, reason = queue[task.task_id]
        task.gone_since = None
        shown = state.lower() + (f" ({reason})" if reason not in ("", "None") else "")
        if shown != task.state:
            log.info("Slurm job %s (job %d): %s", task.task_id, task.num, shown)
            task.state = shown
        meaning = stuck_reason(reason) if state == "PENDING" else None
        if meaning is None:
            task.stuck_since = None
            continue
        task.stuck_since = task.stuck_since if task.stuck_since is not None else now
        if now - task.stuck_since >= STUCK_GRACE_S.get(reason.split(",")[0].strip(), 0.0):
            task.failure = (f"Slurm job {task.task_id} was pending for a reason that cannot "
                            f"clear ({reason}: {meaning}); cancelled")
            stuck.append(task.task_id)
    if stuck:
        slurm.cancel(stuck)
