"""ZeRO sharding of optimizer state: plans, explicit collectives, memory reports."""

from ._collectives import BUCKET_BYTES as BUCKET_BYTES
from ._collectives import all_gather as all_gather
from ._collectives import all_reduce_mean as all_reduce_mean
from ._collectives import reduce_scatter_mean as reduce_scatter_mean
from ._grad import value_and_grad as value_and_grad
from ._hlo import Collective as Collective
from ._hlo import collectives as collectives
from ._hlo import compiled_text as compiled_text
from ._hlo import count_collectives as count_collectives
from ._memory import LeafBytes as LeafBytes
from ._memory import MemoryReport as MemoryReport
from ._memory import measure_memory as measure_memory
from ._memory import memory_report as memory_report
from ._plan import ShardingPlan as ShardingPlan
from ._specs import LeafLayout as LeafLayout
from ._state import FactoredState as FactoredState
from ._state import StateLeaf as StateLeaf
from ._zero import zero as zero
