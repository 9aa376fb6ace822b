"""shardopt: stateful, sharded optimizers for JAX, as Equinox modules."""

from . import checkpoint as checkpoint
from . import distributed as distributed
from . import sharding as sharding
from ._alias._adam import adam as adam
from ._alias._adam import adamw as adamw
from ._alias._rms import adagrad as adagrad
from ._alias._rms import rmsprop as rmsprop
from ._alias._sgd import sgd as sgd
from ._alias._sign import lion as lion
from ._base import AbstractCountingTransform as AbstractCountingTransform
from ._base import AbstractTransform as AbstractTransform
from ._base import CountState as CountState
from ._base import EmptyState as EmptyState
from ._base import apply_updates as apply_updates
from ._base import identity as identity
from ._hyperparams import AbstractSchedule as AbstractSchedule
from ._interop import OptaxTransform as OptaxTransform
from ._microbatch import AccumulationType as AccumulationType
from ._microbatch import microbatch as microbatch
from ._optimizer import Optimizer as Optimizer
from ._schedules._basic import constant_schedule as constant_schedule
from ._schedules._basic import cosine_decay_schedule as cosine_decay_schedule
from ._schedules._basic import exponential_decay as exponential_decay
from ._schedules._basic import join_schedules as join_schedules
from ._schedules._basic import linear_schedule as linear_schedule
from ._schedules._basic import (
    piecewise_constant_schedule as piecewise_constant_schedule,
)
from ._schedules._basic import polynomial_schedule as polynomial_schedule
from ._schedules._basic import (
    warmup_cosine_decay_schedule as warmup_cosine_decay_schedule,
)
from ._transforms._accumulation import MultiSteps as MultiSteps
from ._transforms._accumulation import MultiStepsState as MultiStepsState
from ._transforms._clipping import clip as clip
from ._transforms._clipping import clip_by_global_norm as clip_by_global_norm
from ._transforms._combinators import Chain as Chain
from ._transforms._combinators import Masked as Masked
from ._transforms._combinators import MaskedState as MaskedState
from ._transforms._combinators import chain as chain
from ._transforms._combinators import masked as masked
from ._transforms._decay import add_decayed_weights as add_decayed_weights
from ._transforms._moments import scale_by_adam as scale_by_adam
from ._transforms._moments import trace as trace
from ._transforms._rms import scale_by_rms as scale_by_rms
from ._transforms._rms import scale_by_rss as scale_by_rss
from ._transforms._rms import scale_by_stddev as scale_by_stddev
from ._transforms._scale import scale as scale
from ._transforms._scale import scale_by_learning_rate as scale_by_learning_rate
from ._transforms._scale import scale_by_schedule as scale_by_schedule
from ._transforms._sign import scale_by_lion as scale_by_lion
from .checkpoint import CheckpointManager as CheckpointManager
from .distributed import LaunchError as LaunchError
from .distributed import LaunchResult as LaunchResult
from .distributed import ProcessMismatchError as ProcessMismatchError
from .distributed import ProcessResult as ProcessResult
from .distributed import check_processes_agree as check_processes_agree
from .distributed import initialize_multihost as initialize_multihost
from .distributed import launch_local as launch_local
from .sharding import FactoredState as FactoredState
from .sharding import ShardingPlan as ShardingPlan
from .sharding import memory_report as memory_report
from .sharding import zero as zero
