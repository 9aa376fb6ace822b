"""Flax linen front end: ``shardopt.linen.TrainState`` in place of flax's.

Importing this module imports flax; ``import shardopt`` alone does not.
"""

from ._integrations._common import UnannotatedModelWarning as UnannotatedModelWarning
from ._integrations._linen import TrainState as TrainState
from ._integrations._linen import param_specs as param_specs
from ._integrations._linen import restore as restore
from ._integrations._linen import save as save
from ._integrations._linen import unbox as unbox
