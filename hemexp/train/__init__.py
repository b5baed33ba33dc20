"""Lightning training: shared plumbing (:mod:`hemexp.train.common`) and one module per model."""
