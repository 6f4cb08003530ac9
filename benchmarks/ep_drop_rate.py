"""Share of routed assignments the capacity dispatches drop, against the capacity factor, at a trained
v3_small's routing (bias included) on its validation batches: expert_parallel (each shard's rows to each
destination, then each expert's slots; `moe.expert_parallel_buffers`) and capacity (each expert's slots
over the whole batch).

Run: `python benchmarks/ep_drop_rate.py RUN_DIR` on 8 simulated CPU devices (set here), where RUN_DIR is a
v3_small run, e.g. trained with `--config.model.moe_dispatch=expert_parallel --config.mesh.expert=8`.
Prints a markdown table (training-mode forward passes only, a few minutes).
"""
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsjax import config as config_lib  # noqa: E402
from dsjax import sharding  # noqa: E402
from dsjax.data import pipeline  # noqa: E402
from dsjax.infer import loading  # noqa: E402
from dsjax.model.transformer import Transformer  # noqa: E402

FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0)
EVAL_BATCHES = 4


def main(run_dir: str):
    loaded = loading.load_orbax(run_dir)
    config = config_lib.from_saved(json.loads((pathlib.Path(run_dir) / 'config.json').read_text()))
    batches = pipeline.make_eval_batches(config.data, loaded.tokenizer, num_batches=EVAL_BATCHES)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, expert=8, tensor=1))
    variables = jax.device_get(loaded.variables)
    print(f'{run_dir}: {EVAL_BATCHES} validation batches of {config.data.batch_size} x {config.data.seq_len} tokens, '
          f'{loaded.cfg.n_routed_experts} experts top-{loaded.cfg.num_experts_per_tok} on 8 expert shards\n')
    print('| capacity factor | expert_parallel dropped | capacity dropped |\n|---|---|---|')
    for factor in FACTORS:
        row = []
        for dispatch in ('expert_parallel', 'capacity'):
            cfg = dataclasses.replace(loaded.cfg, moe_dispatch=dispatch, capacity_factor=factor)

            def dropped(batch):
                _, aux = Transformer(cfg).apply(variables, batch['inputs'], batch['positions'], batch['segment_ids'],
                                                batch['targets'], deterministic=False, apply_head=False)
                return aux['dropped']

            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
                run = jax.jit(dropped)
                row.append(np.mean([float(run(sharding.global_batch(b, mesh))) for b in batches]))
        print(f'| {factor} | {row[0]:.1%} | {row[1]:.1%} |')


if __name__ == '__main__':
    main(sys.argv[1])
