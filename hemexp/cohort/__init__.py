"""Cohort stage (``rules/cohort.smk``): who the patients are and what Table 1 says about them.

Modules: :mod:`~hemexp.cohort.manifest` (manifest TSV: read, validate every row at once, write),
:mod:`~hemexp.cohort.patients` (the patient table the Snakefile builds its DAG from),
:mod:`~hemexp.cohort.table1` (paper Table 1), :mod:`hemexp.cohort.synth` (the synthetic
ground-truth cohort) and :mod:`~hemexp.cohort.cli` (``validate-manifest``, ``cohort-table``, ``synth``).
"""
