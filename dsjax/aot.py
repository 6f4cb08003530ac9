"""Ahead-of-time compilation: an experiment's programs compiled for a TPU topology on a CPU-only host
(libtpu, no TPU present) or for a simulated CPU mesh, with what the compiler says they need.

    python -m dsjax.aot --config=experiments/v3.py --topology=v5p-1024
    python -m dsjax.aot --config=experiments/v3_small.py:smoke --topology=v5e-4
    python -m dsjax.aot --config=experiments/v3.py --topology=cpu:512 --hbm_gib=80
    python -m dsjax.aot --config=experiments/r1.py --topology=v5p-128 --program=decode --context=131072 --batch=1

Programs: 'train' is the loop's own pre-training step (loop.build_state_fns + step.make_train_step,
jitted by loop.jit_train_step); 'prefill' and 'decode' are dsjax.infer.decode's prefill of a prompt
of `context` tokens and one decode step over a cache of `context` slots.

Per device it reports the bytes of the parameters, optimizer state, temporaries and their total
against the chip's HBM, FLOPs per step (the compiled matmuls next to dsjax.model.flops; XLA's cost
analysis too, which counts a scanned layer once), projected tokens/s at a stated MFU, and the
collectives by kind with their bytes per step (from the compiled HLO, loop bodies counted once per
iteration). A program that does not fit ends in one line naming the topology and the bytes.

Topologies: v5p-<TensorCores> (2 per chip, as Google names the slices), v5e-<chips>, v6e-<chips>,
powers of two; cpu:<N> for N simulated CPU devices (argument bytes are exact, temporaries are the CPU
compiler's, no proxy for an accelerator's).
"""
import collections
import dataclasses
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.data import batch_ramp, pipeline
from dsjax.infer import cache as cache_lib
from dsjax.infer import decode
from dsjax.model import attention, flops, moe, transformer
from dsjax.model.transformer import Transformer
from dsjax.train import loop
from dsjax.train import step as step_lib

GIB = 2 ** 30
# Load over the compiled program's FLOPs that the projection assumes (MaxText's published runs of
# DeepSeek-V3 on v5p report 40-50%).
DEFAULT_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: its topology prefix, core layout and per-chip limits."""
    prefix: str  # libtpu's topology name prefix
    chip_config: str  # 'megacore': one device per chip spanning its two TensorCores
    dims: int  # torus dimensions
    hbm_bytes: float  # usable HBM per chip, as libtpu's RESOURCE_EXHAUSTED messages state it
    peak_flops: float  # dense bf16 FLOP/s per chip (Google Cloud's TPU pages)


CHIPS = {
    'v5e': Chip('v5e', 'default', 2, 15.75 * GIB, 197e12),
    'v5p': Chip('v5', 'megacore', 3, 95.74 * GIB, 459e12),
    'v6e': Chip('v6e', 'default', 2, 31.25 * GIB, 918e12),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: tuple
    chip: Chip | None  # None: simulated CPU devices
    hbm_bytes: float  # what the report compares against


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """Slice shape of `chips` (a power of two): start at 2x2(x1), double the last of the shortest sides
    (v5p-256 = 4x4x8, v5e-128 = 8x16), as Google's slice names lay them out."""
    shape = [1] * dims if chips < 4 else [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        shortest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == shortest)
        shape[last] *= 2
    return tuple(shape)


def topology(name: str, hbm_gib: float = 0.0) -> Topology:
    """Devices of a TPU slice ('v5p-1024', 'v5e-4', 'v6e-256') or of N simulated CPU devices ('cpu:N')."""
    if name.startswith('cpu:'):
        n = int(name[4:])
        devices = jax.devices('cpu')
        if len(devices) < n:
            raise ValueError(f'--topology={name}: only {len(devices)} CPU devices; start with '
                             f'--xla_force_host_platform_device_count={n} (python -m dsjax.aot does)')
        return Topology(name, tuple(devices[:n]), None, hbm_gib * GIB)
    kind, _, size = name.partition('-')
    if kind not in CHIPS or not size.isdigit() or int(size) & (int(size) - 1):
        raise ValueError(f'--topology={name!r} is invalid: give v5p-<cores>, v5e-<chips> or v6e-<chips> '
                         '(a power of two), or cpu:<devices>')
    chip = CHIPS[kind]
    chips = int(size) // 2 if chip.chip_config == 'megacore' else int(size)
    shape = _torus(max(chips, 1), chip.dims)
    # Google's slices close a side into a ring once it spans a full cube (v5p, 4 chips) or 16 chips (v5e, v6e).
    full = 4 if chip.dims == 3 else 16
    wrap = tuple(s >= full and (chip.dims == 2 or chips >= 64) for s in shape) + (False,) * (3 - chip.dims)
    # Compiling never runs anything, so several processes (tests, other compiles) may load libtpu at once.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies  # loads libtpu, only when a TPU topology is asked for
    desc = topologies.get_topology_desc(
        topology_name=f'{chip.prefix}:{"x".join(map(str, shape))}', platform='tpu', chip_config_name=chip.chip_config,
        chips_per_host_bounds=(2, 2, 1) if chips >= 4 else (1, 1, 1), num_slices=1, wrap=wrap)
    return Topology(name, tuple(desc.devices), chip, hbm_gib * GIB or chip.hbm_bytes)


# ---------------------------------------------------------------- the programs

@dataclasses.dataclass
class Program:
    """A lowered program and what the report needs besides the compiler's numbers."""
    lowered: jax.stages.Lowered
    params: object  # abstract sharded parameters (ShapeDtypeStructs)
    opt_state: object  # abstract sharded optimizer state ({} when serving)
    tokens: int  # tokens one call processes
    model_flops: float  # dsjax.model.flops' count for one call, whole mesh


def _sharded(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def train_program(config, mesh) -> Program:
    """The loop's pre-training step, lowered with its own state shardings and a batch of shapes."""
    model_cfg = config_lib.freeze_model(config.model)
    model = Transformer(model_cfg)
    optimizer, apply_gradients = loop.optimizer_tail(config, batch_ramp.from_config(config.data, config.train.micro_batches))
    train_step = step_lib.make_train_step(model, apply_gradients, config.train)
    b, length = config.data.batch_size, config.data.seq_len
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, state, state_shardings = loop.build_state_fns(model, optimizer, mesh, length)
        rows = sharding.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((b, length), jnp.float32 if k == 'weights' else jnp.int32, sharding=rows)
                 for k in pipeline.FIELDS}
        lowered = loop.jit_train_step(train_step, state_shardings, mesh).lower(state, batch)
    return Program(lowered, state.params, state.opt_state, b * length,
                   flops.train_flops_per_token(model_cfg, length) * b * length)


def serving_rules(batch: int, mesh) -> tuple:
    """The logical rules with rows left whole when `batch` does not split over the batch axes (batch-1
    decoding: every device of a batch axis then holds the one row, and works on its heads / experts)."""
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if batch % shards == 0:
        return sharding.DEFAULT_RULES
    return tuple((name, None if name == 'batch' else axes) for name, axes in sharding.DEFAULT_RULES)


def serving_program(config, mesh, program: str, context: int, batch: int) -> Program:
    """decode.prefill of a `context`-token prompt, or one decode.decode_step over a cache of `context`
    slots, with the variables laid out as training lays them out and the cache by cache_shardings."""
    cfg = config_lib.freeze_model(config.model)
    if context > cfg.max_position_embeddings:
        config_lib.fail('model.max_position_embeddings', cfg.max_position_embeddings,
                        f'--context={context} needs at least that many positions (a YaRN config such as r1.py)')
    rules = serving_rules(batch, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # Shapes only: a concrete key or array would be placed on the mesh, whose TPU devices are not here.
        # One block of tokens: the attention kernel resolved for `context` (splash) takes whole blocks.
        rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        tokens = jax.ShapeDtypeStruct((1, attention.SPLASH_BLOCK), jnp.int32)
        boxed = jax.eval_shape(Transformer(cfg).init, rng, tokens)
        variables = sharding.sharded_shapes(boxed, mesh, rules)
        cache = _sharded(jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, context)),
                         cache_lib.cache_shardings(cfg, mesh, rules=rules))
        rows = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec('batch'), mesh, rules)
        if program == 'prefill':
            prompt = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=rows)
            lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
            fn = lambda v, p, n, c: decode.prefill(cfg, v, p, n, c)
            lowered = jax.jit(fn, donate_argnums=(3,)).lower(variables, prompt, lengths, cache)
            tokens = batch * context
            model_flops = (2 * flops.activated_matmul_params(cfg, include_mtp=False)
                           + flops.attention_flops_per_token(cfg, context)) * tokens
        else:
            step = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
            active = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows)
            key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
            fn = lambda v, t, p, a, c, k: decode.decode_step(cfg, v, t, p, a, c, k, decode.SamplingConfig())
            lowered = jax.jit(fn, donate_argnums=(4,)).lower(variables, step, step, active, cache, key)
            tokens = batch
            # One new token attends to all `context` slots: twice the causal average.
            model_flops = (2 * flops.activated_matmul_params(cfg, include_mtp=False)
                           + 2 * flops.attention_flops_per_token(cfg, context)) * tokens
    return Program(lowered, variables['params'], {}, tokens, model_flops)


# ---------------------------------------------------------------- reading the compiled program

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'ragged-all-to-all')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')
_SHAPE = re.compile(r'\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2|c64)\[([\d,]*)\]')
_CALLS = re.compile(r'\b(calls|body|condition|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SCALAR_CONSTANT = re.compile(r'=\s*s32\[\]\S*\s+constant\((\d+)\)')
_BITS = {'pred': 8, 's4': 4, 'u4': 4, 's8': 8, 'u8': 8, 's16': 16, 'u16': 16, 's32': 32, 'u32': 32, 's64': 64,
         'u64': 64, 'f16': 16, 'bf16': 16, 'f32': 32, 'f64': 64, 'f8e4m3fn': 8, 'f8e5m2': 8, 'c64': 64}


def _shape_bytes(text: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(',') if d) * _BITS[t] // 8 for t, dims in _SHAPE.findall(text))


def _dims(text: str) -> tuple[int, ...]:
    """The dimensions of the first array shape in `text`."""
    m = _SHAPE.search(text)
    return tuple(int(d) for d in m.group(2).split(',') if d) if m else ()


def _matmul_flops(opcode: str, result: str, rest: str, shapes: dict) -> int:
    """2 x output x contraction of a dot, or of a convolution (how TPU HLO writes most matmuls): its
    kernel's input-feature dimension ('i' in dim_labels)."""
    operands = re.findall(r'%([\w.\-]+)', rest.split(')')[0])
    out = math.prod(_dims(result))
    if opcode == 'dot':
        lhs = shapes.get(operands[0], ())
        contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
        return 2 * out * math.prod(lhs[int(i)] for i in contracting.group(1).split(',') if i) if lhs else 0
    rhs = shapes.get(operands[1], ()) if len(operands) > 1 else ()
    labels = re.search(r'dim_labels=\w+_(\w+)->', rest)
    if not rhs or not labels or 'i' not in labels.group(1):
        return 0
    # The kernel's spatial taps are not counted: a matmul's are 1, and XLA writes batched matmuls as
    # dilated windows of which one tap reaches each output.
    return 2 * out * rhs[labels.group(1).index('i')]


def hlo_totals(hlo_text: str) -> collections.Counter:
    """Per step and device, from a compiled module's text: 'flops' (dots and convolutions), and for each
    collective kind its result bytes and (key kind#) its executions. A loop body counts once per
    iteration: the loop's known trip count, else the bound its condition compares the counter with (a
    scan's `i < n`); XLA's own cost analysis counts a loop body once. Asynchronous collectives count at
    '-done', or where the collective sits inside the computation the async op calls."""
    own = collections.defaultdict(collections.Counter)  # computation -> counts
    calls = collections.defaultdict(list)  # computation -> [(callee, trip count or None, condition)]
    bounds = collections.defaultdict(list)  # computation -> its s32[] constants
    shapes = {}  # instruction -> dims (names are unique within a module)
    current, entry = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and '=' not in line.split('(')[0]:
            current = header.group(1)
            entry = current if line.startswith('ENTRY') else entry
            continue
        inst = _INSTRUCTION.match(line)
        if current is None or not inst:
            continue
        if constant := _SCALAR_CONSTANT.search(line):
            bounds[current].append(int(constant.group(1)))
        result, opcode, rest = inst.groups()
        name = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)', line).group(1)
        shapes[name] = _dims(result)
        kind = opcode[:-5] if opcode.endswith('-done') else opcode
        if kind in _COLLECTIVES and not opcode.endswith('-start'):
            own[current][kind + '#'] += 1
            own[current][kind] += _shape_bytes(result)
        if opcode in ('dot', 'convolution'):
            own[current]['flops'] += _matmul_flops(opcode, result, rest, shapes)
        called = {attr: re.findall(r'[\w.\-]+', names) for attr, names in _CALLS.findall(rest)}
        trips = int(m.group(1)) if (m := _TRIP_COUNT.search(rest)) else None
        for attr, names in called.items():
            if attr in ('to_apply', 'condition'):
                continue
            for callee in names:
                condition = called.get('condition', [None])[0] if attr == 'body' else None
                calls[current].append((callee, trips, condition))

    memo = {}

    def total(name):
        if name not in memo:
            out = collections.Counter(own[name])
            for callee, trips, condition in calls[name]:
                if trips is None:
                    trips = bounds[condition][0] if condition and len(bounds[condition]) == 1 else 1
                for k, v in total(callee).items():
                    out[k] += trips * v
            memo[name] = out
        return memo[name]

    return total(entry)


def collectives(totals: collections.Counter) -> dict[str, tuple[int, int]]:
    """{kind: (executions, bytes)} of `hlo_totals`."""
    return {k: (totals[k + '#'], totals[k]) for k in _COLLECTIVES if totals[k + '#']}


def _device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Report:
    """What one compile says, per device."""
    program: str
    config: str
    topology: Topology
    mesh: dict
    batch: int
    seq: int
    remat: str
    attention_impl: str
    params_bytes: int
    opt_state_bytes: int
    memory: object  # CompiledMemoryStats
    flops: float  # XLA's cost analysis, per device (a loop body counted once)
    hlo_flops: float  # dots and convolutions of the compiled module, per device, loop bodies per iteration
    model_flops: float  # dsjax.model.flops', per device
    tokens: int
    collectives: dict
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        m = self.memory
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.topology.hbm_bytes

    def verdict(self) -> str:
        """One line: fits, or what it needs against what the chip has."""
        where = f'{self.program} {self.config} on {self.topology.name} (batch {self.batch} x {self.seq})'
        m = self.memory
        return (f'{where} {"fits" if self.fits else "does not fit"}: needs {self.total_bytes / GIB:.2f} GiB per '
                f'device ({m.argument_size_in_bytes / GIB:.2f} GiB arguments, {m.temp_size_in_bytes / GIB:.2f} GiB '
                f'temporaries), HBM {self.topology.hbm_bytes / GIB:.2f} GiB')

    def tokens_per_second(self, mfu: float) -> float:
        """Tokens per second per chip at `mfu` of its peak over the model's FLOPs per device (times the
        devices for the slice's)."""
        chip = self.topology.chip
        if chip is None or not self.model_flops:
            return float('nan')
        return mfu * chip.peak_flops / self.model_flops * self.tokens / len(self.topology.devices)

    def lines(self, mfu: float = DEFAULT_MFU) -> list[str]:
        m, t = self.memory, self.topology
        gib = lambda b: f'{b / GIB:.2f} GiB'
        mesh = ' x '.join(f'{a} {n}' for a, n in self.mesh.items() if n > 1) or 'one device'
        out = [
            f'{self.program} {self.config} on {t.name}: {len(t.devices)} devices, mesh {mesh}, '
            f'batch {self.batch} x {self.seq}, remat {self.remat}, attention {self.attention_impl}, '
            f'compiled in {self.compile_seconds:.0f} s',
            f'per device: parameters {gib(self.params_bytes)}, optimizer state {gib(self.opt_state_bytes)}, '
            f'arguments {gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)} '
            f'({gib(m.alias_size_in_bytes)} aliased), temporaries {gib(m.temp_size_in_bytes)}; '
            f'total {gib(self.total_bytes)} of {gib(t.hbm_bytes)} HBM: {"fits" if self.fits else "DOES NOT FIT"}',
            f'FLOPs per device per step: model {self.model_flops:.3e}; compiled matmuls {self.hlo_flops:.3e} '
            f'({self.hlo_flops / max(self.model_flops, 1):.2f}x; Pallas kernels not counted); XLA cost '
            f'analysis {self.flops:.3e} (scanned layers once)',
        ]
        if t.chip is not None:
            per_chip = self.tokens_per_second(mfu)
            out.append(f'projected {per_chip:,.0f} tokens/s per chip ({per_chip * len(t.devices):,.0f} for the '
                       f'slice) at {mfu:.0%} MFU of {t.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip')
        out.append('collectives per device per step: ' + (', '.join(
            f'{k} {n}x {v / GIB:.2f} GiB' for k, (n, v) in self.collectives.items()) or 'none'))
        return out


class DoesNotFit(Exception):
    """A program needs more memory per device than the topology's chips have."""


def resolve_for(config, platform: str, length: int):
    """A copy of `config` with its 'auto' model fields resolved as they would be on `platform` for
    sequences of `length` (this host's backend is the CPU whatever the target)."""
    config = config.copy_and_resolve_references()
    m = config.model
    cfg = config_lib.freeze_model(m)
    mla = cfg.attention_type == 'mla'
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if mla else cfg.attn_head_dim
    m.remat_policy = transformer.resolve_remat(cfg, platform)
    m.attention_impl = attention.resolve_impl(cfg, qk, cfg.v_head_dim if mla else qk, platform, length)
    m.moe_dispatch = moe.resolve_dispatch(cfg.moe_dispatch, cfg.capacity_factor, platform)
    return config


def compile_program(name: str, config, topology_: Topology, program: str = 'train', context: int = 0,
                    batch: int = 1) -> Report:
    """Compiles `program` of `config` for the topology's devices. Raises DoesNotFit with a one-line message
    when the compiler runs out of HBM; a total over HBM shows in the report (`fits`, `verdict`)."""
    devices = list(topology_.devices)
    config = resolve_for(config, 'cpu' if topology_.chip is None else 'tpu',
                         config.data.seq_len if program == 'train' else context)
    config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    if program == 'train':
        built, batch, seq = train_program(config, mesh), config.data.batch_size, config.data.seq_len
    else:
        built, seq = serving_program(config, mesh, program, context, batch), context
    start = time.perf_counter()
    where = f'{program} {name} on {topology_.name} (batch {batch} x {seq})'
    try:
        compiled = built.lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        raise DoesNotFit(f'{where} does not fit: {str(e).splitlines()[0]}') from None
    seconds = time.perf_counter() - start
    totals = hlo_totals(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = len(devices)
    report = Report(
        program=program, config=name, topology=topology_, mesh=dict(mesh.shape), batch=batch, seq=seq,
        remat=config.model.remat_policy, attention_impl=config.model.attention_impl,
        params_bytes=_device_bytes(built.params), opt_state_bytes=_device_bytes(built.opt_state),
        memory=compiled.memory_analysis(),
        flops=float(cost.get('flops', 0.0)), hlo_flops=float(totals['flops']), model_flops=built.model_flops / n,
        tokens=built.tokens, collectives=collectives(totals), compile_seconds=seconds)
    return report


# ---------------------------------------------------------------- command line

def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    topo_name = f.topology
    if topo_name.startswith('cpu:'):
        # Before any backend starts: the simulated devices.
        jax.config.update('jax_num_cpu_devices', int(topo_name[4:]))
    name = f['config'].config_filename
    try:
        report = compile_program(name, f.config, topology(topo_name, f.hbm_gib), f.program, f.context, f.batch)
    except (DoesNotFit, config_lib.ConfigError, ValueError) as e:
        sys.exit(f'error: {e}')
    print('\n'.join(report.lines(f.mfu)))
    if not report.fits:
        sys.exit(f'error: {report.verdict()}')
    print(report.verdict())


if __name__ == '__main__':
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/v3.py.', lock_config=True)
    flags.DEFINE_string('topology', None, 'v5p-<cores>, v5e-<chips>, v6e-<chips> or cpu:<devices>.')
    flags.DEFINE_enum('program', 'train', ('train', 'prefill', 'decode'), 'What to compile.')
    flags.DEFINE_integer('context', 32768, 'prefill / decode: prompt tokens / cache slots.')
    flags.DEFINE_integer('batch', 1, 'prefill / decode: rows.')
    flags.DEFINE_float('hbm_gib', 0.0, 'Memory per device to compare against (default: the TPU chip\'s HBM).')
    flags.DEFINE_float('mfu', DEFAULT_MFU, 'Model FLOP utilisation the tokens/s projection assumes.')
    flags.mark_flags_as_required(['config', 'topology'])
    app.run(main)
