"""Clinical-guidance study (paper Fig. 3): single-variable perturbations and the guidance-scale sweep.

Modules: :mod:`~hemexp.evaluation.guidance.effects` (per-patient effects, separation, learned vs the
synthetic growth law) and :mod:`~hemexp.evaluation.guidance.run` (batched sampling of every setting,
tables and figures: ``hemexp perturb``).
"""
