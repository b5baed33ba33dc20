"""The workflow's HTML report, built after a full run by the Snakefile's ``onsuccess`` handler."""

from __future__ import annotations

from typing import Any


# ---------------------------------------------------------------------------- workflow report
def report_command(workflow: Any, report_path: str) -> list[str] | None:
    """The ``snakemake --report`` command that reproduces a finished run's DAG, or None to skip.

    Only a run of the default target has every report() file (no explicit targets, --until,
    --omit-from, --allowed-rules, --touch). Same interpreter, Snakefile, --configfile and --config as
    the run; --nolock because the finished run still holds the lock while its onsuccess handler runs.
    """
    ds = workflow.dag_settings
    if workflow.touch or ds.targets or ds.target_jobs or ds.until or ds.omit_from or ds.allowed_rules:
        return None
    import sys

    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(workflow.main_snakefile), "--nolock",
           "--report", str(report_path)]
    configfiles = [str(f) for f in workflow.overwrite_configfiles]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    if workflow.config_settings.config_args:
        cmd += ["--config", *workflow.config_settings.config_args]
    return cmd


def build_report(workflow: Any, report_path: str) -> int | None:
    """Write the HTML report after a full run (the Snakefile's onsuccess); returns the exit code.

    A failure prints the command to rerun by hand and does not turn the finished run into a failed one.
    """
    import subprocess
    import sys

    cmd = report_command(workflow, report_path)
    if cmd is None:
        return None
    from pathlib import Path

    from hemexp.core.errors import collect_failures
    from hemexp.workflow.benchmarks import collect_rule_times

    collect_failures(Path(report_path).parent)  # qc/failures.rst, included by report/workflow.rst
    collect_rule_times(Path(report_path).parent)  # benchmarks/rule_times.rst, included there too
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        print(f"WARNING: building the report failed (exit {code}); rerun by hand: {' '.join(cmd)}", file=sys.stderr)
    return code
