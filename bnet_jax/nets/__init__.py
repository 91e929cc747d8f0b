"""Multi-exit networks: the shared representation and the registered families."""

from bnet_jax.nets.core import (Network, Outputs, Stage, Variables, apply_head, apply_trunk,
                                check_images, count_params, forward, init, main_logits,
                                module_names, transplant)
from bnet_jax.nets.registry import (AUTO, canonical_options, get, inference_options, names,
                                    resolve_options)
