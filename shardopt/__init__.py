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
from ._alias._contrib import acprop as acprop
from ._alias._contrib import ademamix as ademamix
from ._alias._contrib import adopt as adopt
from ._alias._contrib import cocob as cocob
from ._alias._contrib import dadapt_adamw as dadapt_adamw
from ._alias._contrib import dog as dog
from ._alias._contrib import dowg as dowg
from ._alias._contrib import madgrad as madgrad
from ._alias._contrib import momo as momo
from ._alias._contrib import momo_adam as momo_adam
from ._alias._contrib import prodigy as prodigy
from ._alias._contrib import simplified_ademamix as simplified_ademamix
from ._alias._factored import adafactor as adafactor
from ._alias._factored import sm3 as sm3
from ._alias._galore import galore as galore
from ._alias._matrix import muon as muon
from ._alias._matrix import shampoo as shampoo
from ._alias._matrix import soap as soap
from ._alias._privacy import dpsgd as dpsgd
from ._alias._rms import adagrad as adagrad
from ._alias._rms import rmsprop as rmsprop
from ._alias._schedule_free import schedule_free_adamw as schedule_free_adamw
from ._alias._schedule_free import schedule_free_sgd as schedule_free_sgd
from ._alias._second_order import lbfgs as lbfgs
from ._alias._sgd import sgd as sgd
from ._alias._sign import lion as lion
from ._alias._sign import sign_sgd as sign_sgd
from ._alias._sign import signum as signum
from ._alias._sophia import sophia as sophia
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
from ._debug import NonFiniteError as NonFiniteError
from ._debug import debug_nans as debug_nans
from ._hyperparams import AbstractSchedule as AbstractSchedule
from ._interop import OptaxTransform as OptaxTransform
from ._jit import JitStep as JitStep
from ._jit import jit_step as jit_step
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
from ._transforms._acprop_adopt import scale_by_acprop as scale_by_acprop
from ._transforms._acprop_adopt import scale_by_adopt as scale_by_adopt
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
from ._transforms._ademamix import ScaleByAdemamixState as ScaleByAdemamixState
from ._transforms._ademamix import (
    ScaleBySimplifiedAdEMAMixState as ScaleBySimplifiedAdEMAMixState,
)
from ._transforms._ademamix import scale_by_ademamix as scale_by_ademamix
from ._transforms._ademamix import (
    scale_by_simplified_ademamix as scale_by_simplified_ademamix,
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
from ._transforms._complex import (
    SplitRealAndImaginaryState as SplitRealAndImaginaryState,
)
from ._transforms._complex import split_real_and_imaginary as split_real_and_imaginary
from ._transforms._conditional import apply_every as apply_every
from ._transforms._conditional import conditionally_mask as conditionally_mask
from ._transforms._conditional import conditionally_transform as conditionally_transform
from ._transforms._conditional import periodic_update as periodic_update
from ._transforms._decay import add_decayed_weights as add_decayed_weights
from ._transforms._dog import DoGState as DoGState
from ._transforms._dog import DoWGState as DoWGState
from ._transforms._dog import (
    scale_by_distance_over_gradients as scale_by_distance_over_gradients,
)
from ._transforms._factored import scale_by_factored_rms as scale_by_factored_rms
from ._transforms._finite import apply_if_finite as apply_if_finite
from ._transforms._finite import skip_large_updates as skip_large_updates
from ._transforms._finite import skip_not_finite as skip_not_finite
from ._transforms._finite import zero_nans as zero_nans
from ._transforms._galore import GaLoreDimensionNumbers as GaLoreDimensionNumbers
from ._transforms._galore import GaLoreState as GaLoreState
from ._transforms._galore import scale_by_galore as scale_by_galore
from ._transforms._groups import Group as Group
from ._transforms._groups import GroupsState as GroupsState
from ._transforms._groups import ParamGroups as ParamGroups
from ._transforms._groups import group as group
from ._transforms._groups import group_table as group_table
from ._transforms._groups import param_groups as param_groups
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
from ._transforms._madgrad import MadgradState as MadgradState
from ._transforms._madgrad import scale_by_madgrad as scale_by_madgrad
from ._transforms._matrix_shapes import (
    MuonDimensionNumbers as MuonDimensionNumbers,
)
from ._transforms._matrix_shapes import scale_by_shape as scale_by_shape
from ._transforms._mechanic import MechanicState as MechanicState
from ._transforms._mechanic import mechanize as mechanize
from ._transforms._moments import scale_by_adam as scale_by_adam
from ._transforms._moments import trace as trace
from ._transforms._momo import MomoAdamState as MomoAdamState
from ._transforms._momo import MomoState as MomoState
from ._transforms._muon import MuonState as MuonState
from ._transforms._muon import scale_by_muon as scale_by_muon
from ._transforms._noise import add_noise as add_noise
from ._transforms._normalize import NormalizeState as NormalizeState
from ._transforms._normalize import centralize as centralize
from ._transforms._normalize import normalize as normalize
from ._transforms._normalize import normalize_by_update_norm as normalize_by_update_norm
from ._transforms._parameter_free import COCOBState as COCOBState
from ._transforms._parameter_free import DAdaptAdamWState as DAdaptAdamWState
from ._transforms._parameter_free import ProdigyState as ProdigyState
from ._transforms._parameter_free import scale_by_cocob as scale_by_cocob
from ._transforms._partition import NamedChain as NamedChain
from ._transforms._partition import Partition as Partition
from ._transforms._partition import PartitionState as PartitionState
from ._transforms._partition import freeze as freeze
from ._transforms._partition import multi_transform as multi_transform
from ._transforms._partition import named_chain as named_chain
from ._transforms._partition import partition as partition
from ._transforms._partition import selective_transform as selective_transform
from ._transforms._partition import set_to_zero as set_to_zero
from ._transforms._paths import PathPattern as PathPattern
from ._transforms._per_example import (
    per_example_global_norm_clip as per_example_global_norm_clip,
)
from ._transforms._per_example import (
    per_example_layer_norm_clip as per_example_layer_norm_clip,
)
from ._transforms._plateau import ReduceLROnPlateauState as ReduceLROnPlateauState
from ._transforms._plateau import reduce_on_plateau as reduce_on_plateau
from ._transforms._polyak import scale_by_polyak as scale_by_polyak
from ._transforms._privacy import (
    DifferentiallyPrivateAggregateState as DifferentiallyPrivateAggregateState,
)
from ._transforms._privacy import (
    differentially_private_aggregate as differentially_private_aggregate,
)
from ._transforms._rms import scale_by_rms as scale_by_rms
from ._transforms._rms import scale_by_rss as scale_by_rss
from ._transforms._rms import scale_by_stddev as scale_by_stddev
from ._transforms._rprop import scale_by_rprop as scale_by_rprop
from ._transforms._sam import SAMState as SAMState
from ._transforms._sam import sam as sam
from ._transforms._scale import scale as scale
from ._transforms._scale import scale_by_learning_rate as scale_by_learning_rate
from ._transforms._scale import scale_by_schedule as scale_by_schedule
from ._transforms._schedule_free import ScheduleFreeState as ScheduleFreeState
from ._transforms._schedule_free import schedule_free as schedule_free
from ._transforms._schedule_free import (
    schedule_free_eval_params as schedule_free_eval_params,
)
from ._transforms._shampoo import ShampooState as ShampooState
from ._transforms._shampoo import scale_by_shampoo as scale_by_shampoo
from ._transforms._sign import scale_by_lion as scale_by_lion
from ._transforms._sign import scale_by_sign as scale_by_sign
from ._transforms._sm3 import scale_by_sm3 as scale_by_sm3
from ._transforms._soap import SoapState as SoapState
from ._transforms._soap import scale_by_soap as scale_by_soap
from ._transforms._sophia import HutchinsonState as HutchinsonState
from ._transforms._sophia import SophiaState as SophiaState
from ._transforms._sophia import (
    hutchinson_estimator_diag_hessian as hutchinson_estimator_diag_hessian,
)
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
