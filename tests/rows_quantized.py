"""8-bit quantized state (shardopt._transforms._lowbit): no rows in the table.

The table holds every row to 1e-6 against an optax oracle; 8-bit state stores
each moment to about 0.7 % of its block's largest value, so no float oracle
meets that, and optax has no 8-bit state. tests/test_quantized_state.py checks
what the table would: the numbers against a NumPy reference of the same map,
bit-equal ZeRO stages 0-3 on 8 devices, one compilation, stable dtypes, a
checkpoint round trip, exact bytes in the memory report, and convergence
beside float32 AdamW.
"""

ROWS = []

_HERE = "tests/test_quantized_state.py"
ELSEWHERE = {
    "QuantizeState": f"{_HERE} (stages 0-3 bit-equal, bytes, checkpoint)",
    "quantize_state": f"{_HERE} (stages 0-3 bit-equal, bytes, checkpoint)",
    "quantize": f"{_HERE} (against a NumPy reference)",
    "dequantize": f"{_HERE} (against a NumPy reference)",
    "dynamic_map": f"{_HERE} (Dettmers' map)",
}
