"""Shared pytest fixtures. Keep this file small: one fixture per shared resource, helpers elsewhere
(tests/workflow_helpers.py for Snakemake-driven tests, tests/slurm_cluster.py for SLURM)."""

from __future__ import annotations

import os

import pytest


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM cluster on localhost (installed with apt-get and started when needed).

    Skipped with the reason when SLURM cannot be provided here, except under CI (``CI=true``), where
    that is a failure. Daemons started by the fixture are stopped by PID at the end of the session.
    """
    from slurm_cluster import ClusterUnavailable, start_cluster

    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as err:
        if _under_ci():
            pytest.fail(f"SLURM test cluster unavailable under CI: {err}")
        pytest.skip(f"SLURM test cluster unavailable: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
