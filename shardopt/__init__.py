"""shardopt: stateful, sharded optimizers for JAX, as Equinox modules."""

from . import checkpoint as checkpoint
from . import distributed as distributed
from . import sharding as sharding
from ._alias._adam import adam as adam
from ._alias._adam import adamw as adamw
from ._alias._adam_family import adabelief as adabelief
from ._alias._adam_family import adamax as adamax
from ._alias._adam_family import adamaxw as adamaxw
from ._alias._adam_family import amsgrad as amsgrad
from ._alias._adam_family import nadam as nadam
from ._alias._adam_family import nadamw as nadamw
from ._alias._adam_family import radam as radam
from ._alias._adam_family import yogi as yogi
from ._alias._adam_variants import adan as adan
from ._alias._adam_variants import novograd as novograd
from ._alias._adam_variants import optimistic_adam as optimistic_adam
from ._alias._adam_variants import optimistic_adam_v2 as optimistic_adam_v2
from ._alias._adam_variants import (
    optimistic_gradient_descent as optimistic_gradient_descent,
)
from ._alias._adaptive_steps import adadelta as adadelta
from ._alias._adaptive_steps import noisy_sgd as noisy_sgd
from ._alias._adaptive_steps import polyak_sgd as polyak_sgd
from ._alias._adaptive_steps import rprop as rprop
from ._alias._factored import adafactor as adafactor
from ._alias._factored import sm3 as sm3
from ._alias._rms import adagrad as adagrad
from ._alias._rms import rmsprop as rmsprop
from ._alias._second_order import lbfgs as lbfgs
from ._alias._sgd import sgd as sgd
from ._alias._sign import lion as lion
from ._alias._sign import sign_sgd as sign_sgd
from ._alias._sign import signum as signum
from ._alias._trust_ratio import fromage as fromage
from ._alias._trust_ratio import lamb as lamb
from ._alias._trust_ratio import lars as lars
from ._base import AbstractCountingTransform as AbstractCountingTransform
from ._base import AbstractStatelessTransform as AbstractStatelessTransform
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
from ._schedules._interpolate import (
    piecewise_interpolate_schedule as piecewise_interpolate_schedule,
)
from ._schedules._onecycle import cosine_onecycle_schedule as cosine_onecycle_schedule
from ._schedules._onecycle import linear_onecycle_schedule as linear_onecycle_schedule
from ._schedules._sgdr import sgdr_schedule as sgdr_schedule
from ._schedules._warmup import warmup_constant_schedule as warmup_constant_schedule
from ._schedules._warmup import (
    warmup_exponential_decay_schedule as warmup_exponential_decay_schedule,
)
from ._transforms._accumulation import MultiSteps as MultiSteps
from ._transforms._accumulation import MultiStepsState as MultiStepsState
from ._transforms._adadelta import scale_by_adadelta as scale_by_adadelta
from ._transforms._adam_family import scale_by_adamax as scale_by_adamax
from ._transforms._adam_family import scale_by_amsgrad as scale_by_amsgrad
from ._transforms._adam_family import scale_by_belief as scale_by_belief
from ._transforms._adam_family import scale_by_radam as scale_by_radam
from ._transforms._adam_family import scale_by_yogi as scale_by_yogi
from ._transforms._adam_variants import scale_by_adan as scale_by_adan
from ._transforms._adam_variants import scale_by_novograd as scale_by_novograd
from ._transforms._adam_variants import (
    scale_by_optimistic_gradient as scale_by_optimistic_gradient,
)
from ._transforms._averaging import ema as ema
from ._transforms._averaging import measure_with_ema as measure_with_ema
from ._transforms._averaging import monitor as monitor
from ._transforms._averaging import snapshot as snapshot
from ._transforms._block_clipping import adaptive_grad_clip as adaptive_grad_clip
from ._transforms._block_clipping import clip_by_block_rms as clip_by_block_rms
from ._transforms._clipping import clip as clip
from ._transforms._clipping import clip_by_global_norm as clip_by_global_norm
from ._transforms._combinators import Chain as Chain
from ._transforms._combinators import Masked as Masked
from ._transforms._combinators import MaskedState as MaskedState
from ._transforms._combinators import chain as chain
from ._transforms._combinators import masked as masked
from ._transforms._conditional import apply_every as apply_every
from ._transforms._conditional import conditionally_mask as conditionally_mask
from ._transforms._conditional import conditionally_transform as conditionally_transform
from ._transforms._conditional import periodic_update as periodic_update
from ._transforms._decay import add_decayed_weights as add_decayed_weights
from ._transforms._dog import (
    scale_by_distance_over_gradients as scale_by_distance_over_gradients,
)
from ._transforms._factored import scale_by_factored_rms as scale_by_factored_rms
from ._transforms._finite import apply_if_finite as apply_if_finite
from ._transforms._finite import skip_large_updates as skip_large_updates
from ._transforms._finite import skip_not_finite as skip_not_finite
from ._transforms._finite import zero_nans as zero_nans
from ._transforms._inject import InjectHyperparamsState as InjectHyperparamsState
from ._transforms._inject import inject_hyperparams as inject_hyperparams
from ._transforms._lbfgs import ScaleByLBFGSState as ScaleByLBFGSState
from ._transforms._lbfgs import scale_by_lbfgs as scale_by_lbfgs
from ._transforms._linesearch import (
    ScaleByBacktrackingLinesearchState as ScaleByBacktrackingLinesearchState,
)
from ._transforms._linesearch import (
    scale_by_backtracking_linesearch as scale_by_backtracking_linesearch,
)
from ._transforms._lookahead import LookaheadParams as LookaheadParams
from ._transforms._lookahead import lookahead as lookahead
from ._transforms._lowbit import QuantizedArray as QuantizedArray
from ._transforms._lowbit import QuantizeState as QuantizeState
from ._transforms._lowbit import dequantize as dequantize
from ._transforms._lowbit import dynamic_map as dynamic_map
from ._transforms._lowbit import quantize as quantize
from ._transforms._lowbit import quantize_state as quantize_state
from ._transforms._moments import scale_by_adam as scale_by_adam
from ._transforms._moments import trace as trace
from ._transforms._noise import add_noise as add_noise
from ._transforms._normalize import centralize as centralize
from ._transforms._normalize import normalize_by_update_norm as normalize_by_update_norm
from ._transforms._partition import NamedChain as NamedChain
from ._transforms._partition import Partition as Partition
from ._transforms._partition import PartitionState as PartitionState
from ._transforms._partition import freeze as freeze
from ._transforms._partition import multi_transform as multi_transform
from ._transforms._partition import named_chain as named_chain
from ._transforms._partition import partition as partition
from ._transforms._partition import selective_transform as selective_transform
from ._transforms._partition import set_to_zero as set_to_zero
from ._transforms._per_example import (
    per_example_global_norm_clip as per_example_global_norm_clip,
)
from ._transforms._per_example import (
    per_example_layer_norm_clip as per_example_layer_norm_clip,
)
from ._transforms._plateau import ReduceLROnPlateauState as ReduceLROnPlateauState
from ._transforms._plateau import reduce_on_plateau as reduce_on_plateau
from ._transforms._polyak import scale_by_polyak as scale_by_polyak
from ._transforms._rms import scale_by_rms as scale_by_rms
from ._transforms._rms import scale_by_rss as scale_by_rss
from ._transforms._rms import scale_by_stddev as scale_by_stddev
from ._transforms._rprop import scale_by_rprop as scale_by_rprop
from ._transforms._scale import scale as scale
from ._transforms._scale import scale_by_learning_rate as scale_by_learning_rate
from ._transforms._scale import scale_by_schedule as scale_by_schedule
from ._transforms._sign import scale_by_lion as scale_by_lion
from ._transforms._sign import scale_by_sign as scale_by_sign
from ._transforms._sm3 import scale_by_sm3 as scale_by_sm3
from ._transforms._structural import flatten as flatten
from ._transforms._structural import keep_params_nonnegative as keep_params_nonnegative
from ._transforms._structural import scale_gradient as scale_gradient
from ._transforms._structural import stateless as stateless
from ._transforms._structural import stateless_with_tree_map as stateless_with_tree_map
from ._transforms._trust_ratio import (
    scale_by_param_block_norm as scale_by_param_block_norm,
)
from ._transforms._trust_ratio import (
    scale_by_param_block_rms as scale_by_param_block_rms,
)
from ._transforms._trust_ratio import scale_by_trust_ratio as scale_by_trust_ratio
from ._transforms._value_and_grad import (
    value_and_grad_from_state as value_and_grad_from_state,
)
from ._transforms._zoom_linesearch import (
    ScaleByZoomLinesearchState as ScaleByZoomLinesearchState,
)
from ._transforms._zoom_linesearch import ZoomLinesearchInfo as ZoomLinesearchInfo
from ._transforms._zoom_linesearch import (
    scale_by_zoom_linesearch as scale_by_zoom_linesearch,
)
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
