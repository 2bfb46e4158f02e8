"""Slurm launcher: requests planned from sinfo, the queue followed with squeue, and sweeps run on
a real one-node Slurm cluster.

The tests marked ``cluster`` need the cluster that ``make test-slurm`` starts
(scripts/slurm/test.sh sets VGGT4D_SLURM_TESTS=1 and SLURM_CONF); ``make test`` skips them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from experiments.sweep_summary import summarize
from hydra_plugins.vggt4d_plugins.slurm_launcher import executor_parameters
from tests.clips import write_noise_frames
from vggt4d.cluster import (
    GIB,
    JobNeeds,
    Node,
    Request,
    Slurm,
    Task,
    job_needs,
    parse_gres,
    parse_sinfo,
    parse_squeue,
    parse_time_limit,
    plan_request,
    stuck_reason,
    watch,
)
from vggt4d.config.cluster import ClusterConfig
from vggt4d.errors import UserError

cluster = pytest.mark.skipif(os.environ.get("VGGT4D_SLURM_TESTS") != "1",
                             reason="needs the one-node Slurm cluster of `make test-slurm`")

SMALL_NODE = Node("debug", "vm", cpus=2, memory_mb=24105, gpus=0, state="idle",
                  max_time_min=None, default=True)
GPU_NODES = [Node("gpu", f"g{i}", cpus=32, memory_mb=256000, gpus=4, state="idle",
                  max_time_min=2880) for i in range(2)]


def needs(device: str = "auto", cpu_gib: float | None = 3, cuda_gib: float | None = 1,
          count: int = 2) -> list[JobNeeds]:
    return [JobNeeds(device, None if cpu_gib is None else int(cpu_gib * GIB),
                     None if cuda_gib is None else int(cuda_gib * GIB))] * count


# --- sinfo / squeue ----------------------------------------------------------------

def test_sinfo_lines_give_nodes_with_gpus_limits_and_the_default_partition():
    text = ("debug*|vm|2|24105|(null)|idle|infinite\n"
            "gpu|g1|64|515000+|gpu:a100:4(S:0-1),gpu:t4:2|mixed|1-12:00:00\n"
            "short|s1|8|16000|gpu:1|down*|30:00\n")
    nodes = parse_sinfo(text)
    assert nodes[0] == SMALL_NODE
    assert (nodes[1].partition, nodes[1].gpus, nodes[1].memory_mb, nodes[1].max_time_min,
            nodes[1].default) == ("gpu", 6, 515000, 36 * 60, False)
    assert (nodes[2].gpus, nodes[2].state, nodes[2].max_time_min) == (1, "down*", 30)
    assert parse_gres("(null)") == 0
    assert parse_gres("gpu:2,mps:100") == 2
    assert parse_time_limit("2:00:00") == 120
    assert parse_time_limit("5") == 5
    assert parse_time_limit("0:30:01") == 31  # seconds round up
    assert parse_time_limit("UNLIMITED") is None


def test_squeue_lines_and_reasons_that_never_clear():
    queue = parse_squeue("12_0|PENDING|PartitionConfig\n12_1|RUNNING|None\n"
                         "12_2|PENDING|ReqNodeNotAvail, UnavailableNodes:n[1-2]\n")
    assert queue == {"12_0": ("PENDING", "PartitionConfig"), "12_1": ("RUNNING", "None"),
                     "12_2": ("PENDING", "ReqNodeNotAvail, UnavailableNodes:n[1-2]")}
    assert stuck_reason("PartitionConfig") is not None
    assert stuck_reason(queue["12_2"][1]) is not None
    for clears in ("Resources", "Priority", "None", "JobArrayTaskLimit", "BeginTime"):
        assert stuck_reason(clears) is None


# --- resource plans ----------------------------------------------------------------

def test_cpu_node_gets_no_gpu_a_share_of_cpus_and_memory_from_the_estimate():
    request = plan_request(ClusterConfig(), needs(), [SMALL_NODE])
    # 2 jobs on a 2-CPU node: 1 CPU each; 3 GiB × 1.25 = 3.75 → 4 GB
    assert request == Request(partition=None, partition_name="debug", gpus=0, cpus=1,
                              mem_gb=4, time_min=120)
    small = plan_request(ClusterConfig(), needs(cpu_gib=0.5, count=1), [SMALL_NODE])
    assert (small.cpus, small.mem_gb) == (2, 2)  # one job takes the node's 2 CPUs; at least 2 GB


def test_gpu_partition_plans_gpus_only_for_cuda_jobs():
    cluster = ClusterConfig(partition="gpu")
    auto = plan_request(cluster, needs(cpu_gib=40, cuda_gib=3, count=8), GPU_NODES)
    # 8 jobs, 4 GPUs a node: 4 at once on a node → 32 / 4 = 8 CPUs; CUDA host memory 3 × 1.25
    assert (auto.partition, auto.gpus, auto.cpus, auto.mem_gb) == ("gpu", 1, 8, 4)
    cpu = plan_request(cluster, needs("cpu", cpu_gib=40, cuda_gib=3, count=8), GPU_NODES)
    # no GPU: 8 jobs at once share 32 CPUs; the CPU forward's 40 GiB × 1.25 = 50
    assert (cpu.gpus, cpu.cpus, cpu.mem_gb) == (0, 4, 50)
    explicit = plan_request(ClusterConfig(partition="gpu", gpus_per_job=2, cpus_per_job=6,
                                          mem_gb=20, time_limit_min=600),
                            needs("cuda:0"), GPU_NODES)
    assert (explicit.gpus, explicit.cpus, explicit.mem_gb, explicit.time_min) == (2, 6, 20, 600)
    assert plan_request(ClusterConfig(partition="gpu", gpus_per_job=0),
                        needs(), GPU_NODES).gpus == 0


def test_a_partition_whose_nodes_are_all_down_is_planned_with_a_warning(caplog):
    down = [Node("debug", "a", 2, 24105, 0, "down*", None, True),
            Node("debug", "b", 2, 24105, 0, "drained", None, True)]
    with caplog.at_level(logging.WARNING, logger="vggt4d.cluster"):
        assert plan_request(ClusterConfig(), needs(), down).cpus == 1
    assert [r.getMessage() for r in caplog.records] == [
        "no node of partition debug that can hold the jobs is up now (a: down*, b: drained); "
        "they will wait until one is"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vggt4d.cluster"):
        plan_request(ClusterConfig(), needs(), [*down, SMALL_NODE])
    assert not caplog.records


def test_unknown_memory_needs_fall_back_to_a_default_that_fits():
    request = plan_request(ClusterConfig(), needs(cpu_gib=None, cuda_gib=None), [SMALL_NODE])
    assert request.mem_gb == 8
    tiny = Node("debug", "t", cpus=1, memory_mb=4000, gpus=0, state="idle", max_time_min=None,
                default=True)
    assert plan_request(ClusterConfig(), needs(cpu_gib=None), [tiny]).mem_gb == 3


@pytest.mark.parametrize(("cluster", "jobs", "nodes", "message"), [
    (ClusterConfig(partition="gpu"), needs(), [SMALL_NODE],
     "cluster.partition=gpu: no such Slurm partition (sinfo lists debug)"),
    (ClusterConfig(), needs(), GPU_NODES, "no default partition"),
    (ClusterConfig(gpus_per_job=1), needs(), [SMALL_NODE],
     "cluster.gpus_per_job=1 but partition debug has no GPUs"),
    (ClusterConfig(partition="gpu", gpus_per_job=1), needs("cpu"), GPU_NODES,
     "cluster.gpus_per_job=1 but the jobs run on CPU"),
    (ClusterConfig(), needs("cuda"), [SMALL_NODE], "device=cuda but partition debug has no GPUs"),
    (ClusterConfig(cpus_per_job=64), needs(), [SMALL_NODE],
     "fits no node of partition debug (largest: 0 GPU(s), 2 CPU(s), 23.5 GB)"),
    (ClusterConfig(mem_gb=64), needs(), [SMALL_NODE], "fits no node"),
    (ClusterConfig(partition="gpu", gpus_per_job=8), needs(), GPU_NODES, "fits no node"),
    (ClusterConfig(), needs(cpu_gib=30), [SMALL_NODE],
     "each job needs about 38 GB (memory estimate"),
    (ClusterConfig(partition="gpu", time_limit_min=3000), needs(), GPU_NODES,
     "cluster.time_limit_min=3000 exceeds partition gpu's limit of 2880 min"),
    (ClusterConfig(cpus_per_job=0), needs(), [SMALL_NODE],
     "cluster.cpus_per_job=0 must be >= 1 (or null = automatic)"),
])
def test_requests_that_cannot_run_are_refused_in_one_line(cluster, jobs, nodes, message):
    with pytest.raises(UserError) as err:
        plan_request(cluster, jobs, nodes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_submitit_parameters_carry_the_plan():
    params = {"submitit_folder": "/s/%j", "max_num_timeout": 0, "timeout_min": 999,
              "cpus_per_task": None, "gpus_per_node": None, "tasks_per_node": 1, "mem_gb": None,
              "nodes": 1, "name": "run", "stderr_to_stdout": False, "partition": None,
              "qos": None, "array_parallelism": 8, "additional_parameters": {}, "setup": None}
    cpu = executor_parameters(params, Request(None, "debug", 0, 1, 4, 120))
    assert cpu == {"timeout_min": 120, "cpus_per_task": 1, "tasks_per_node": 1, "mem_gb": 4,
                   "nodes": 1, "name": "run", "stderr_to_stdout": False,
                   "slurm_array_parallelism": 8, "slurm_additional_parameters": {}}
    gpu = executor_parameters(params, Request("gpu", "gpu", 2, 8, 10, 60))
    assert (gpu["slurm_partition"], gpu["gpus_per_node"]) == ("gpu", 2)


# --- what a job needs, before it runs -------------------------------------------------------

def _validated(*overrides: str):
    from hydra import compose, initialize_config_module

    from vggt4d.config import validate

    with initialize_config_module("conf", version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


def test_job_needs_the_estimate_of_its_largest_forward(tmp_path):
    from vggt4d.model import build_network, head_features, parameter_count
    from vggt4d.resources import estimate_forward_memory

    for index in range(5):
        Image.new("RGB", (100, 60)).save(tmp_path / f"f{index}.png")
    base = ["data=images", f"data.path={tmp_path}", "process_res=112", "device=cpu"]
    net = build_network("da3-small", empty=True)

    def expected(frames: int) -> int:
        # 100x60 at 112: 112 x 67.2 → multiples of 14: 112 x 70; ViT-S width 384, fp32
        return estimate_forward_memory(
            num_params=parameter_count(net), frames=frames, height=70, width=112, embed_dim=384,
            head_features=head_features("da3-small"), dtype=torch.float32).total

    whole = job_needs(_validated(*base))
    assert (whole.device, whole.cpu_bytes, whole.adapts) == ("cpu", expected(5), False)
    assert whole.cuda_bytes < whole.cpu_bytes
    chunked = job_needs(_validated(*base, "chunk.length=3", "chunk.overlap=1"))
    assert chunked.cpu_bytes == expected(3)
    assert job_needs(_validated(*base, "memory_limit_gb=0.5")).cpu_bytes == GIB // 2
    assert job_needs(_validated(*base, "chunk.auto=true")).adapts
    missing = job_needs(_validated("data=images", f"data.path={tmp_path / 'none'}"))
    assert (missing.cpu_bytes, missing.cuda_bytes) == (None, None)


def test_jobs_that_fit_their_chunks_to_memory_ask_for_a_node_at_most():
    adapting = [JobNeeds("auto", 30 * GIB, GIB, adapts=True)] * 2
    assert plan_request(ClusterConfig(), adapting, [SMALL_NODE]).mem_gb == 23  # 24105 MB


# --- following the queue ----------------------------------------------------------------

class FakeSlurm:
    """Answers sacct, squeue and scancel from a script: ``queues`` is one squeue answer per call
    (the last one repeats)."""

    def __init__(self, queues: list[str], accounting: bool = False, clock=None):
        self.queues, self.accounting, self.clock = queues, accounting, clock
        self.calls, self.timed_calls = [], []

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(command)
        self.timed_calls.append((self.clock() if self.clock else 0.0, command))
        name = command[0]
        if name == "sacct":
            if not self.accounting:
                return subprocess.CompletedProcess(command, 1, "",
                                                   "Slurm accounting storage is disabled\n")
            return subprocess.CompletedProcess(command, 0, "OUT_OF_MEMORY\n", "")
        if name == "squeue":
            text = self.queues.pop(0) if len(self.queues) > 1 else self.queues[0]
            if text == "purged":
                return subprocess.CompletedProcess(
                    command, 1, "", "slurm_load_jobs error: Invalid job id specified\n")
            return subprocess.CompletedProcess(command, 0, text, "")
        return subprocess.CompletedProcess(command, 0, "", "")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def tasks_in(folder: Path, count: int) -> list[Task]:
    return [Task(f"7_{i}", folder / f"7_{i}_result.pkl", i, folder / f"7_{i}.err")
            for i in range(count)]


def test_watch_cancels_tasks_stuck_in_the_queue(tmp_path, caplog):
    clock = FakeClock()
    fake = FakeSlurm(["7_0|PENDING|PartitionConfig\n7_1|PENDING|ReqNodeNotAvail, "
                      "UnavailableNodes:n1\n7_2|PENDING|Resources\n"], clock=clock)
    tasks = tasks_in(tmp_path, 3)
    tasks[2].result.write_bytes(b"done")  # task 2 finished; its result is there
    with caplog.at_level(logging.INFO, logger="vggt4d.cluster"):
        watch(tasks, Slurm(run=fake), clock=clock, sleep=clock.sleep)
    assert tasks[0].failure == ("Slurm job 7_0 was pending for a reason that cannot clear "
                                "(PartitionConfig: the request exceeds what the partition "
                                "allows); cancelled")
    assert "ReqNodeNotAvail" in tasks[1].failure
    assert tasks[2].failure is None
    # a final reason is cancelled at first sight, missing nodes after a minute
    cancels = [(when, call[1:]) for when, call in fake.timed_calls if call[0] == "scancel"]
    assert cancels[0] == (0.0, ["7_0"])
    assert len(cancels) == 2 and cancels[1][1] == ["7_1"] and 60 <= cancels[1][0] <= 70
    notices = [r for r in caplog.records if "accounting is not available" in r.getMessage()]
    assert len(notices) == 1


def test_watch_reports_tasks_that_leave_without_a_result(tmp_path, caplog):
    queues = ["7_0|RUNNING|None\n7_1|PENDING|Resources\n"] * 3 + ["7_1|RUNNING|None\n", "purged"]
    fake, clock = FakeSlurm(queues), FakeClock()
    tasks = tasks_in(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger="vggt4d.cluster"):
        watch(tasks, Slurm(run=fake), clock=clock, sleep=clock.sleep)
    for task in tasks:
        assert task.failure == (f"Slurm job {task.task_id} ended without a result (state unknown "
                                f"without accounting); see {task.log_path}")
    assert clock.now < 60
    messages = [r.getMessage() for r in caplog.records]
    assert sum("accounting is not available" in m for m in messages) == 1  # not once per poll
    assert "Slurm job 7_1 (job 1): pending (Resources)" in messages
    assert not any(call[0] == "scancel" for call in fake.calls)


def test_watch_ends_when_results_appear_and_names_final_states_with_accounting(tmp_path):
    fake, clock = FakeSlurm(["7_0|RUNNING|None\n", ""], accounting=True), FakeClock()
    tasks = tasks_in(tmp_path, 2)
    tasks[1].result.write_bytes(b"done")
    watch(tasks, Slurm(run=fake), clock=clock, sleep=clock.sleep)
    assert tasks[0].failure.startswith("Slurm job 7_0 ended without a result (state "
                                       "OUT_OF_MEMORY)")
    assert tasks[1].failure is None


# --- a real one-node cluster ---------------------------------------------------------------

SWEEP = ["model=da3-small", "model.weights=random", "logger=none", "process_res=56",
         "pipeline=[masks,eval]"]


def _slurm_sweep(cwd: Path, *overrides: str) -> tuple[int, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "VGGT4D_CACHE_DIR": str(cwd / "cache")}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vggt4d.run", "-m", "hydra/launcher=slurm",
                           *SWEEP, *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=170, check=False)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def _finished_jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())


def _slurm_job_id(job: Path) -> str:
    return yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]


@cluster
def test_readme_band_sweep_runs_under_slurm_with_one_da3_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output, _ = _slurm_sweep(tmp_path, "data.num_frames=3", "bands.middle=[1,3],[1,2]",
                                   f"hydra.sweep.dir={sweep_dir}")
    assert code == 0, output[-3000:]
    assert "Slurm request: partition debug: no GPU, 1 CPU(s), 2 GB" in output
    assert output.count("Slurm accounting is not available") == 1
    assert "Bypassing sacct error" not in output
    jobs = _finished_jobs(sweep_dir)
    assert [job.name for job in jobs] == ["0", "1"]
    for job in jobs:
        slurm_id = _slurm_job_id(job)
        assert re.fullmatch(r"\d+_[01]", slurm_id)
        assert (sweep_dir / ".submitit" / slurm_id / f"{slurm_id}_0_log.out").is_file()
        assert len(list((job / "masks").glob("dynamic_*.png"))) == 3
    logs = [(job / "run.log").read_text() for job in jobs]
    assert sum("predict: reused cached result" in text for text in logs) == 1

    csv_path, png_path = summarize(sweep_dir)
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["bands.middle"] for row in rows] == ["[1,3]", "[1,2]"]
    assert png_path.stat().st_size > 0


@cluster
def test_a_job_failing_under_slurm_is_named_and_the_other_kept(tmp_path):
    frames = write_noise_frames(tmp_path / "frames", 3, 60, 80)
    missing = tmp_path / "no_such_folder"
    sweep_dir = tmp_path / "sweep"
    code, output, seconds = _slurm_sweep(tmp_path, "data=images", f"data.path={frames},{missing}",
                                         f"hydra.sweep.dir={sweep_dir}")
    assert code == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: job")]
    assert errors == [f"error: job 1 (data.path={missing}) failed: data.path={missing}: "
                      f"no such directory"]
    assert "error: 1 of 2 sweep job(s) failed; the 1 finished job(s) are in" in output
    assert [job.name for job in _finished_jobs(sweep_dir)] == ["0"]
    assert not (sweep_dir / "1").exists()  # failed before any result: no job folder
    assert seconds < 150


@cluster
def test_a_request_no_node_can_hold_is_refused_before_submitting(tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output, _ = _slurm_sweep(tmp_path, "cluster.cpus_per_job=64", "bands.deep=[5,5],[4,5]",
                                   f"hydra.sweep.dir={sweep_dir}")
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "fits no node of partition debug" in errors[0]
    assert not (sweep_dir / ".submitit").exists()


@cluster
def test_jobs_pending_for_a_reason_that_cannot_clear_are_cancelled_and_named(tmp_path):
    failed = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap=false"],
                            capture_output=True, text=True, check=True).stdout.strip()
    for _ in range(100):  # until Slurm knows the job failed
        queue = subprocess.run(["squeue", "--noheader", f"--jobs={failed}"],
                               capture_output=True, text=True, check=False)
        if not queue.stdout.strip():
            break
        time.sleep(0.2)
    code, output, seconds = _slurm_sweep(
        tmp_path, "data.num_frames=3", "bands.middle=[1,3],[1,2]",
        f'+hydra.launcher.additional_parameters.dependency="afterok:{failed}"',
        f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 1, output[-3000:]
    errors = re.findall(r"error: job .*", output)
    assert len(errors) == 2
    for num, band in enumerate(["[1,3]", "[1,2]"]):
        assert re.fullmatch(rf"error: job {num} \(bands.middle={re.escape(band)}\) failed: Slurm "
                            rf"job \d+_{num} was pending for a reason that cannot clear "
                            rf"\(DependencyNeverSatisfied: a job it depends on failed\); "
                            rf"cancelled", errors[num])
    array = re.search(r"Slurm job (\d+)_0", output).group(1)
    left = subprocess.run(["squeue", "--noheader", f"--jobs={array}"], capture_output=True,
                          text=True, check=False).stdout
    assert "PENDING" not in left and "RUNNING" not in left
    assert seconds < 60


@cluster
def test_a_benchmark_tables_sequences_run_as_one_slurm_array(tmp_path):
    """``python -m vggt4d.benchmark`` with the Slurm launcher on the synthetic scene written in
    DAVIS's layout: each sequence is a task of one array, the table lists both."""
    from vggt4d.datasets.export import export_synthetic
    from vggt4d.synthetic import SyntheticConfig

    manifest = export_synthetic(tmp_path / "data", ["davis2016"],
                                SyntheticConfig(num_frames=3, width=56, height=42), 2)
    davis = tmp_path / "data" / manifest["datasets"]["davis2016"]["root"]
    out = tmp_path / "table"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "VGGT4D_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "vggt4d.benchmark", "table=davis2016_masks",
                           f"root={davis}", f"out={out}", "sequences=all", "model=da3-small",
                           "model.weights=random", "process_res=56", "logger=none",
                           "hydra/launcher=slurm"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=170, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Slurm request: partition debug" in output
    table = json.loads((out / "table.json").read_text())
    names = manifest["datasets"]["davis2016"]["sequences"]
    assert [row["sequence"] for row in table["sequences"]] == names and table["failed"] == []
    arrays = {_slurm_job_id(out / "sequences" / name).split("_")[0] for name in names}
    assert len(arrays) == 1  # one array, a task per sequence
