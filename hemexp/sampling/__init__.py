"""Sampling stage (``rules/sampling.smk``): simulated follow-ups of a patient.

Modules: :mod:`~hemexp.sampling.sampler` (the one guided sampling loop, chunking, encode/decode,
follow-up generation), :mod:`~hemexp.sampling.flags` (expansion-flag plans and sources),
:mod:`~hemexp.sampling.classifier` (built-in HE classifier, a flag source),
:mod:`~hemexp.sampling.scenarios` (clinical edits), :mod:`~hemexp.sampling.intervals` (order-statistic
intervals), :mod:`~hemexp.sampling.products` (3D volumes, probability maps, volume table, summary),
:mod:`~hemexp.sampling.figure` (per-patient figure), :mod:`~hemexp.sampling.simulate` (one new patient
from raw files: ``hemexp simulate``) and :mod:`~hemexp.sampling.cli`.
"""
