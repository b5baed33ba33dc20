"""Baselines stage (``rules/baselines.smk``): the comparison methods of Table 2.

Copy-baseline needs no model (the baseline masks are its prediction); :mod:`hemexp.baselines.nnunet`
trains and runs nnU-Net v2 in its own environment. :mod:`~hemexp.baselines.cli` holds the ``nnunet-*``
commands.
"""
