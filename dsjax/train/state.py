"""The training state: everything a step reads and writes, and nothing else."""
from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, optimizer state, PRNG key and non-gradient buffers.

    `buffers` holds variable collections the optimizer never sees (the MoE routing
    bias of DeepSeek-V3 lives in `buffers['moe_bias']`); it is `{}` for dense models.
    `nonfinite_skips` counts the steps whose update was dropped for a NaN/Inf loss or
    gradient (`train.nonfinite_policy='skip'`); it is None outside the training loop.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    buffers: Any
    nonfinite_skips: Any = None

    def variables(self):
        """The Flax variables dict for `model.apply`."""
        return {'params': self.params, **self.buffers}
