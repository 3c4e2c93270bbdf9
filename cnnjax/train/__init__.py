"""Training: state, pure steps, the fit loop, sharding and checkpoints."""
