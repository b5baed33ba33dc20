"""Release stage (``rules/release.smk``): trained variants as shareable MLflow models.

:mod:`~hemexp.release.bundle` assembles what ``hemexp simulate`` needs, :mod:`~hemexp.release.card`
writes the model card from the run's own tables, :mod:`~hemexp.release.pyfunc` is the served model,
:mod:`~hemexp.release.register` registers a variant (alias ``@candidate``) and promotes a version
(``@champion``, by a person's decision). Reading a registered model back (``--models models:/...``) is
:mod:`hemexp.tracking.registry`, which earlier stages may import.
"""
