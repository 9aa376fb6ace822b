"""Flax NNX front end: ``shardopt.nnx.Optimizer`` in place of ``nnx.Optimizer``.

Importing this module imports flax; ``import shardopt`` alone does not.
"""

from ._integrations._common import UnannotatedModelWarning as UnannotatedModelWarning
from ._integrations._nnx import Optimizer as Optimizer
from ._integrations._nnx import model_specs as model_specs
from ._integrations._nnx import restore as restore
from ._integrations._nnx import save as save
