"""Synthetic ground-truth ICH cohort (``hemexp synth``): procedural head CTs with hematomas that grow
by a known law of the clinical variables, written as DICOM/NIfTI with masks, manifest and truth.

Modules: :mod:`~hemexp.synth.law` (pure growth law), :mod:`~hemexp.synth.clinical` (Table-1 draws),
:mod:`~hemexp.synth.anatomy` (head phantom), :mod:`~hemexp.synth.lesion` (clot, growth, IVH, mass
effect), :mod:`~hemexp.synth.scan` (acquisition), :mod:`~hemexp.synth.dicom_writer` (series writer,
reusable by tests), :mod:`~hemexp.synth.cohort` (orchestration and outputs). Nothing is imported
here, so ``hemexp.synth.law`` stays a light, pure import for evaluation code.
"""
