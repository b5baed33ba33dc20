"""File names of the transforms a preprocessed patient folder holds (``<patient>/transforms/``).

Their own module, free of ANTs, so that the stages that only *read* a preprocessed folder (ingest,
shard, the evaluation tables) locate these files without importing the registration stack, which
costs seconds per job (ANTsPy pulls in statsmodels) across thousands of per-patient jobs.
:mod:`hemexp.preprocess.register` writes them and re-exports the names.
"""

TRANSFORMS_DIR = "transforms"
BL_TO_TEMPLATE = "bl_to_template.mat"  # template point -> native baseline point (ANTs "fwd" convention)
FU_TO_BL_RIGID = "fu_to_bl_rigid.mat"  # initialisation of the affine stage, kept for inspection
FU_TO_BL = "fu_to_bl.mat"  # native baseline point -> native follow-up point (rigid composed in)
NATIVE_GRID = "native_grid.json"  # shape + affine of the native baseline scan
MODEL_GRID = "model_grid.json"
