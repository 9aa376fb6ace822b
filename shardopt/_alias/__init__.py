"""The catalogue: optimizers that only compose transforms, by family."""
