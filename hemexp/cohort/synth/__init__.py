"""Synthetic ground-truth ICH cohort (``hemexp synth``): procedural head CTs with hematomas that grow
by a known law of the clinical variables, written as DICOM/NIfTI with masks, manifest and truth.

Modules: :mod:`~hemexp.cohort.synth.law` (pure growth law), :mod:`~hemexp.cohort.synth.clinical` (Table-1 draws),
:mod:`~hemexp.cohort.synth.anatomy` (head phantom), :mod:`~hemexp.cohort.synth.lesion` (clot, growth, IVH, mass
effect), :mod:`~hemexp.cohort.synth.scan` (acquisition), :mod:`~hemexp.cohort.synth.dicom_writer` (series writer,
reusable by tests), :mod:`~hemexp.cohort.synth.cohort` (orchestration and outputs). Nothing is imported
here, so ``hemexp.cohort.synth.law`` stays a light, pure import for evaluation code.
"""
