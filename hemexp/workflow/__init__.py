"""Workflow glue for the Snakefile: :mod:`~hemexp.workflow.resources` (per-rule cluster resources),
:mod:`~hemexp.workflow.resolved_config` (the merged config every job reads), :mod:`~hemexp.workflow.report`
(HTML report after a full run) and :mod:`~hemexp.workflow.cli` (``hemexp failures``). The last layer:
it may import every stage, and no stage imports it."""
