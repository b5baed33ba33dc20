"""Many SLURM jobs logging to the MLflow store at once: no run is lost, none is half written.

Under ``--profile slurm`` several training/evaluation jobs log at the same time, and the default
store is one SQLite file under ``results/`` (:func:`hemexp.tracking.runs.tracking_uri`). SQLite on a
shared filesystem is a known source of ``database is locked`` errors and lost writes (MLflow issues
#4123, #5917), so this test measures it instead of assuming either way: it submits a SLURM job array
to the one-node test cluster (tests/slurm_cluster.py) whose tasks all wait at a barrier, then each
opens a run with :func:`~hemexp.tracking.runs.start_run`, logs params and a metric history, and logs
an evaluation metric and an artifact with :func:`~hemexp.tracking.runs.log_to_model_run` - the calls
the training and evaluation rules make. The runs counted before and after must differ by exactly the
number of jobs, and every run must hold its own values. docs/orchestration.md ("Tracking on a
cluster") records what was measured.

The test node has as many CPUs as the host (2 on a small CI runner), which would let only that many
jobs run at once; a temporary partition with ``OverSubscribe=FORCE`` on the same node lets all of them
run together (it is deleted afterwards, and the cluster's own ``debug`` partition is left untouched).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from workflow_helpers import REPO, manifest_config, write_config, write_manifest

from hemexp.tracking.runs import RUN_ID_FILE, start_run, tracking_uri

N_JOBS = int(os.environ.get("HEMEXP_TRACKING_JOBS", "12"))  # concurrent writers (>= 8); env for experiments
STEPS = 5  # metric history length per run: several writes per run, as in training
PARTITION = "hemexp-tracking"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "PREEMPTED"}

# One array task: wait until every task is running (so the writes really overlap), then log one
# model's run exactly as the training and evaluation rules do, through hemexp.tracking.runs.
JOB_SCRIPT = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path

    import mlflow
    import yaml

    from hemexp.tracking.runs import log_to_model_run, start_run

    cfg = yaml.safe_load(Path(sys.argv[1]).read_text())
    barrier, n = Path(sys.argv[2]), int(sys.argv[3])
    i = int(os.environ["SLURM_ARRAY_TASK_ID"])
    (barrier / f"ready-{i}").touch()
    deadline = time.monotonic() + 30  # a node that cannot run all tasks at once still finishes
    while len(list(barrier.glob("ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    run_dir = Path(cfg["results_dir"]) / "models" / f"job{i}"
    with start_run(cfg, "concurrency", run_dir, variant=f"job{i}", params={"job": i, "lr": i / 1000}):
        for step in range(int(sys.argv[4])):
            mlflow.log_metric("train_loss", i + step / 10, step=step)
    report = run_dir / "report.md"
    report.write_text(f"# job {i}\\n")
    log_to_model_run(cfg, run_dir, {"score": i * 1.5}, artifacts=[report], artifact_path="evaluation")
''')


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture()
def shared_partition(slurm_cluster):
    """A partition on the test node whose CPUs jobs share, so ``N_JOBS`` run at once; removed after.

    Falls back to the cluster's default partition (fewer jobs at once, still correct) when the
    controller refuses to create one, e.g. on a cluster this session does not administer.
    """
    made = _scontrol("create", f"PartitionName={PARTITION}", f"Nodes={slurm_cluster.node}", "State=UP",
                     f"OverSubscribe=FORCE:{N_JOBS}", "MaxTime=INFINITE")
    try:
        yield PARTITION if made.returncode == 0 else None
    finally:
        if made.returncode == 0:
            _scontrol("delete", f"PartitionName={PARTITION}")


def _wait_for_array(job_id: str, timeout: float) -> dict[str, str]:
    """Task id -> final state of every task of array ``job_id`` (MinJobAge keeps finished ones listed)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%K|%T"],
                             capture_output=True, text=True, timeout=30)
        states = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
        if len(states) == N_JOBS and set(states.values()) <= TERMINAL:
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
            pytest.fail(f"array {job_id} not finished within {timeout:.0f} s: {states}")
        time.sleep(0.5)


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=10_000)


def _all_runs(uri: str) -> list:
    """Runs of every experiment in the store (a run filed under the wrong experiment still counts)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, max_results=10_000, run_view_type=ViewType.ALL)


@pytest.mark.slurm
def test_concurrent_slurm_jobs_lose_no_runs(slurm_cluster, shared_partition, tmp_path, monkeypatch):
    """``N_JOBS`` array tasks log to the default store at once; every run arrives complete."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store a `--profile slurm` run uses
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under <cwd>/mlruns
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01"], ["TE01"])
    cfg = manifest_config(manifest, results=tmp_path / "results")
    uri = tracking_uri(cfg)
    earlier = {**cfg, "tracking": {**cfg["tracking"], "experiment": "hemexp-earlier"}}
    with start_run(earlier, "concurrency", tmp_path / "results" / "models" / "earlier", params={"job": -1}):
        pass  # an earlier job's run: the SQLite file and its tables exist before the array starts
    # The jobs log into an experiment that does not exist yet, so they also race to create it.
    cfg["tracking"]["experiment"] = "hemexp-concurrency"
    before = len(_all_runs(uri))

    cfg_file = write_config(tmp_path / "config.yaml", cfg)
    (tmp_path / "job.py").write_text(JOB_SCRIPT)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    cmd = [sys.executable, str(tmp_path / "job.py"), str(cfg_file), str(barrier), str(N_JOBS), str(STEPS)]
    sbatch = ["sbatch", "--parsable", f"--array=0-{N_JOBS - 1}", "--cpus-per-task=1", "--mem=300",
              "--time=5", f"--chdir={tmp_path}", f"--output={logs}/%a.log", "--job-name=hemexp-tracking",
              *([f"--partition={shared_partition}"] if shared_partition else []), "--wrap", " ".join(cmd)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    submitted = subprocess.run(sbatch, capture_output=True, text=True, timeout=60, env=env)
    assert submitted.returncode == 0, submitted.stderr
    states = _wait_for_array(submitted.stdout.strip().split(";")[0], timeout=180)
    elapsed = time.monotonic() - t0
    errors = {k: (logs / f"{k}.log").read_text()[-1500:] for k, s in states.items() if s != "COMPLETED"}
    locked = sum("database is locked" in p.read_text() for p in logs.glob("*.log"))
    print(f"{N_JOBS} concurrent jobs ({'shared CPUs' if shared_partition else 'default partition'}): "
          f"{elapsed:.1f} s; runs before {before}; 'database is locked' in {locked} logs")
    assert not errors, errors

    after = len(_all_runs(uri))
    runs = _runs(uri, cfg["tracking"]["experiment"])
    print(f"runs after {after}, {len(runs)} of them in {cfg['tracking']['experiment']!r}")
    assert after == before + N_JOBS
    assert len(runs) == N_JOBS  # none misfiled in another experiment (e.g. 'Default')
    client = MlflowClient(tracking_uri=uri)
    by_job = {r.data.params["job"]: r for r in runs}
    assert set(by_job) == {str(i) for i in range(N_JOBS)}  # one run per job, none duplicated
    for i in range(N_JOBS):
        run = by_job[str(i)]
        run_dir = tmp_path / "results" / "models" / f"job{i}"
        assert (run_dir / RUN_ID_FILE).read_text().strip() == run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["stage"] == "concurrency" and run.data.tags["variant"] == f"job{i}"
        assert run.data.params == {"job": str(i), "lr": str(i / 1000)}
        assert run.data.metrics == {"train_loss": pytest.approx(i + (STEPS - 1) / 10), "score": i * 1.5}
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(i + s / 10)) for s in range(STEPS)]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/report.md"]
        local = client.download_artifacts(run.info.run_id, "evaluation/report.md", str(tmp_path / f"dl{i}"))
        assert Path(local).read_text() == f"# job {i}\n"
