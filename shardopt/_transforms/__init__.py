"""The transforms: small Modules that each do one thing to the updates."""
