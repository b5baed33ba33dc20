"""Evaluation stage (``rules/evaluation.smk``): how good the samples are.

Modules: :mod:`~hemexp.evaluation.metrics` (MAE, ASSD, coverage, Dice), :mod:`~hemexp.evaluation.table2`
(metric rows, paper Table 2, adherence), :mod:`~hemexp.evaluation.calibration` (interval coverage,
PIT), :mod:`~hemexp.evaluation.collect` (where samples, references and baselines are),
:mod:`~hemexp.evaluation.run` (``hemexp evaluate``: tables, figures, MLflow),
:mod:`~hemexp.evaluation.figures`, :mod:`hemexp.evaluation.guidance` (the clinical-guidance study,
``hemexp perturb``) and :mod:`~hemexp.evaluation.cli`.
"""
