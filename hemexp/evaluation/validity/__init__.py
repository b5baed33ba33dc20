"""Ground-truth validity study: does the simulator obey its inputs on a cohort whose law is known?

Modules: :mod:`~hemexp.evaluation.validity.study` (sampling every test patient for one variant under
both flags, every clinical scenario and guidance profile, both decode modes: ``hemexp validity-sample``),
:mod:`~hemexp.evaluation.validity.diagnostics` (conditioning sensitivity, VAE volume bias),
:mod:`~hemexp.evaluation.validity.scores` (fair CRPS, oracle CRPS, patient bootstrap),
:mod:`~hemexp.evaluation.validity.tables` (effects, guidance, adherence, calibration, targets) and
:mod:`~hemexp.evaluation.validity.report` (products and figure: ``hemexp validity-report``).
"""
