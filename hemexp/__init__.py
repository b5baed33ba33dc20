"""HemExp: clinically-guided latent diffusion for modelling hematoma expansion after ICH."""

import os

# ITK reads its thread count once, when ANTs/ITK first initialises in the process. Multi-threaded
# metric accumulation changes floating-point order, so transforms would differ run to run. Setting
# the default here (every ``hemexp.*`` import runs this first) makes registration bit-repeatable no
# matter which module, test or user script imports ``ants`` afterwards; users can still override it.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

__version__ = "0.1.0"
