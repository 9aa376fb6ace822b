"""ZeRO sharding of optimizer state: plans, explicit collectives, memory reports."""

from ._collectives import BUCKET_BYTES as BUCKET_BYTES
from ._collectives import all_gather as all_gather
from ._collectives import all_reduce_mean as all_reduce_mean
from ._collectives import reduce_scatter_mean as reduce_scatter_mean
from ._collectives import value_and_grad as value_and_grad
from ._plan import FactoredState as FactoredState
from ._plan import LeafLayout as LeafLayout
from ._plan import ShardingPlan as ShardingPlan
from ._plan import StateLeaf as StateLeaf
from ._plan import zero as zero
from ._report import Collective as Collective
from ._report import LeafBytes as LeafBytes
from ._report import MemoryReport as MemoryReport
from ._report import collectives as collectives
from ._report import compiled_text as compiled_text
from ._report import count_collectives as count_collectives
from ._report import measure_memory as measure_memory
from ._report import memory_report as memory_report
