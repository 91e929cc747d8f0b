"""bnet-jax: BranchyNet early-exit networks in JAX and Flax."""

from bnet_jax import criteria, losses, nets

__version__ = "0.1.0"
