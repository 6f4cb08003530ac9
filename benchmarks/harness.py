"""What the benchmarks share: dsjax's train step built as the loop builds it, random batches, and
side-by-side timing (rounds alternating between runners, medians). No flags, so any script can import it."""
import dataclasses
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import loop, optim
from dsjax.train import step as step_lib

EXPERIMENTS = pathlib.Path(__file__).parents[1] / 'experiments'


def random_batch(cfg, batch: int, length: int, seed: int = 0) -> dict:
    """A packed-looking batch of random tokens: one document per row, every target counted."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
            'segment_ids': np.ones((batch, length), np.int32),
            'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            'weights': np.ones((batch, length), np.float32)}


@dataclasses.dataclass
class Ours:
    """A jitted dsjax train step and its (donated) state."""
    step: object
    state: object
    batch: dict
    compiled: object

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / n


def build_ours(c, host_batch) -> Ours:
    """dsjax's train step on one device, built as the loop builds it."""
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    cfg = config_lib.freeze_model(c.model)
    model = Transformer(cfg)
    optimizer = optim.make_optimizer(c.optim)
    schedule = optim.make_schedule(c.optim)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        init, _, shardings = loop.build_state_fns(model, optimizer, mesh, c.data.seq_len)
        state = init(jax.random.PRNGKey(0))
        batch = sharding.global_batch(host_batch, mesh)
        step = jax.jit(step_lib.make_train_step(model, optimizer, schedule, c.train),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                       donate_argnums=(0,))
        compiled = step.lower(state, batch).compile()
    return Ours(compiled, state, batch, compiled)


def side_by_side(runners: dict, repeats: int, steps: int) -> dict:
    """Median seconds per step of each runner, rounds alternating between them."""
    for r in runners.values():
        r.run(1)  # warm-up (compiles / allocates)
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            times[k].append(r.run(steps))
    return {k: statistics.median(v) for k, v in times.items()}
