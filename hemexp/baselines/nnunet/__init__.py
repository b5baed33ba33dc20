"""nnU-Net v2 baselines: :mod:`~hemexp.baselines.nnunet.dataset` (dataset export, layout, prediction ->
masks) and :mod:`~hemexp.baselines.nnunet.run` (its virtualenv, plan, train, predict)."""
