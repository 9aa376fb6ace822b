"""Flax NNX and linen front ends over shardopt's Optimizer (import shardopt.nnx
or shardopt.linen; flax is imported only then)."""
