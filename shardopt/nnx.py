"""Flax NNX front end: ``shardopt.nnx.Optimizer`` in place of ``nnx.Optimizer``.

Importing this module imports flax; ``import shardopt`` alone does not.
"""

from .integrations._common import UnannotatedModelWarning as UnannotatedModelWarning
from .integrations._nnx import Optimizer as Optimizer
from .integrations._nnx import model_specs as model_specs
from .integrations._nnx import restore as restore
from .integrations._nnx import save as save
