"""What each MoE dispatch costs by the compiler's own count: FLOPs and bytes of its compiled program,
against the routed rows' FLOPs (T x K x D x F x 2 per GEMM, 3 GEMMs; x3 for forward + backward).

Run: `python benchmarks/moe_flops.py` (compiles only, nothing runs: ~15 minutes on 2 busy cores); writes
results/moe_flops.md. Hardware: any CPU; libtpu (jax[tpu]) compiles the same programs for a TPU v5e
without one.
Expect: 'ragged' counts the routed FLOPs on TPU (tokamax's megablox kernels), 'grouped' at most ~1.25x
(block padding), 'capacity' factor x routed, 'dense' E / K x routed; on CPU jax lowers ragged_dot to a
masked dot over every expert (E x routed). At decode 'gather' computes only the selected experts.

Training shapes (forward + backward of one dispatch; bf16, float32 on the CPU): v3_small's (8 x 256
tokens, D 256, F 128, 32 experts top-4) and benchmarks/device.py's MoE (8 x 2048 tokens, D 2048, F 1024,
top-4, 32 and 128 experts). Decode shapes (forward, evaluation: nothing dropped): V2-Lite's experts
(D 2048, F 1408, 64 experts top-6) at 1, 16 and 64 tokens, each dispatch as MoE picks it
(`moe.inference_dispatch`) and the alternatives.
"""
import math
import os
import pathlib

import jax
import jax.numpy as jnp

from dsjax.model import moe

TRAIN = {'v3_small': (2048, 256, 128, 32, 4), 'device.py MoE': (16384, 2048, 1024, 32, 4),
         'device.py MoE, 128 experts': (16384, 2048, 1024, 128, 4)}
DECODE = {f'V2-Lite, {t} tokens': (t, 2048, 1408, 64, 6) for t in (1, 16, 64)}
TRAIN_DISPATCHES = ('dense', 'capacity', 'grouped', 'ragged')
DECODE_DISPATCHES = ('dense', 'capacity', 'grouped', 'ragged', 'gather')
CAPACITY_FACTOR = 1.25
RESULTS = pathlib.Path(__file__).parent / 'results' / 'moe_flops.md'


def tpu_device():
    """One TPU v5e chip described by libtpu (no TPU needed), or None where libtpu is missing."""
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(topology_name='v5e:1x1', platform='tpu', chips_per_host_bounds=(1, 1, 1),
                                            num_slices=1, wrap=(False, False, False)).devices[0]
    except Exception as e:  # noqa: BLE001
        print(f'no TPU topology: {type(e).__name__}: {e}')
        return None


def cost(name: str, shape, train: bool, device) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of the compiled dispatch on `device`'s platform, in bf16 (float32 on the CPU,
    whose compiler widens bf16 weights whole before a gather, which would count every expert's)."""
    t, d, f, e, k = shape
    dtype = jnp.float32 if device.platform == 'cpu' else jnp.bfloat16
    capacity = min(t, math.ceil(t * k / e * CAPACITY_FACTOR)) if (train and name == 'capacity') else t
    dispatch = moe.DISPATCH[name]
    on_device = jax.sharding.SingleDeviceSharding(device)
    spec = lambda *s, dtype=dtype: jax.ShapeDtypeStruct(s, dtype, sharding=on_device)

    def forward(x, weights, gate, up, down, idx):
        return dispatch(x, weights, idx, gate, up, down, capacity)[0]

    def loss(*args):
        return jnp.sum(forward(*args).astype(jnp.float32) ** 2)
    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)) if train else forward
    args = (spec(t, d), spec(t, k), spec(e, d, f), spec(e, d, f), spec(e, f, d), spec(t, k, dtype=jnp.int32))
    with jax.default_device(device), jax.set_mesh(jax.sharding.Mesh([device], ('data',))):
        analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return analysis.get('flops', float('nan')), analysis.get('bytes accessed', float('nan'))


def table(title: str, shapes: dict, dispatches, train: bool, devices: dict) -> list[str]:
    passes = 3 if train else 1
    columns = ' | '.join(f'{p} GFLOP | {p} x routed | {p} GB accessed' for p in devices)
    lines = [f'## {title}', '', f'| shape | dispatch | {columns} |', '|---|---|' + '---|---|---|' * len(devices)]
    for label, shape in shapes.items():
        t, d, f, e, k = shape
        routed = passes * 3 * 2 * t * k * d * f
        picked = '' if train else moe.inference_dispatch('capacity', t * k, e, 'tpu')
        for name in dispatches:
            cells = []
            for device in devices.values():
                try:
                    flop, bytes_ = cost(name, shape, train, device)
                    cells.append(f'{flop / 1e9:.2f} | {flop / routed:.2f}x | {bytes_ / 1e9:.2f}')
                except Exception as ex:  # noqa: BLE001
                    cells.append(f'failed: {type(ex).__name__} | | ')
            mark = ' (MoE picks it on TPU, GPU)' if name == picked else ''
            lines.append(f'| {label} (T {t}, D {d}, F {f}, E {e}, K {k}) | {name}{mark} | ' + ' | '.join(cells) + ' |')
            print(lines[-1], flush=True)
    return lines + ['']


def main():
    devices = {'CPU': jax.devices('cpu')[0]}
    tpu = tpu_device()
    if tpu is not None:
        devices['TPU v5e'] = tpu
    lines = [f'# MoE dispatch cost by the compiler\'s count (benchmarks/moe_flops.py)', '',
             f'jax {jax.__version__}; cost_analysis() of each compiled program (float32 on the CPU, bf16 on the TPU); '
             'routed = T x K x D x F x 2 x 3 GEMMs (x3 for forward + backward). Capacity factor '
             f'{CAPACITY_FACTOR} in training, room for every token at decode. The TPU column compiles for one v5e '
             'chip through libtpu; Pallas kernels (tokamax\'s megablox) report their own cost estimate to the '
             'compiler. Bytes accessed count a gather\'s whole operand (XLA\'s cost model), so they overstate '
             '\'gather\' and \'grouped\'. On the CPU, MoE picks \'grouped\' where a TPU or GPU picks \'ragged\'.', '']
    lines += table('Training: forward + backward of the routed experts', TRAIN, TRAIN_DISPATCHES, True, devices)
    lines += table('Decoding: forward at evaluation', DECODE, DECODE_DISPATCHES, False, devices)
    text = '\n'.join(lines) + '\n'
    RESULTS.write_text(text)
    print(text)


if __name__ == '__main__':
    main()
