"""Orbax checkpoints of parameters and Optimizers that restore onto any mesh."""

from ._cli import main as main
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointLockedError as CheckpointLockedError
from ._errors import CheckpointMismatchError as CheckpointMismatchError
from ._errors import CheckpointNotFoundError as CheckpointNotFoundError
from ._errors import ChecksumError as ChecksumError
from ._errors import CorruptCheckpointError as CorruptCheckpointError
from ._manager import CheckpointManager as CheckpointManager
from ._optax import from_optax as from_optax
from ._optax import restore_from_optax as restore_from_optax
from ._optax import to_optax as to_optax
from ._record import Restored as Restored
