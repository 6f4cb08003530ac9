"""What the benchmarks share: dsjax's train step built as the loop builds it, random batches,
side-by-side timing (rounds alternating between runners, medians) and profiler op times. No flags, so
any script can import it."""
import collections
import dataclasses
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.interop import hf_mapping
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
    """A jitted dsjax train step and its (donated) state; `metrics` are the last step's."""
    step: object
    state: object
    batch: dict
    compiled: object
    metrics: dict | None = None

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.state, self.metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
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
        apply_gradients = step_lib.make_apply_gradients(optimizer, schedule, c.train)
        step = jax.jit(step_lib.make_train_step(model, apply_gradients, c.train),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                       donate_argnums=(0,))
        compiled = step.lower(state, batch).compile()
    return Ours(compiled, state, batch, compiled)


def hf_weights(c):
    """Our freshly initialised params as numpy (the same init both sides start from), made on the CPU: on an
    accelerator, memory jax once held stays in its pool, out of PyTorch's reach."""
    cfg = config_lib.freeze_model(c.model)
    with jax.default_device(jax.devices('cpu')[0]):
        variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        return cfg, jax.tree.map(np.asarray, nn.meta.unbox(variables))


class Torch:
    """The same model in HF transformers with a plain PyTorch training step; `loss` is the last step's."""

    def __init__(self, c, host_batch, experts_implementation=None, device: str = 'cpu'):
        """On 'cpu' the model runs in the compute dtype throughout; on an accelerator it keeps float32
        weights and AdamW state and runs under autocast to the compute dtype (our recipe: float32 params,
        bfloat16 compute)."""
        import torch
        import transformers
        cfg, variables = hf_weights(c)
        config = transformers.CONFIG_MAPPING[hf_mapping.hf_config_from_model(cfg)['model_type']](
            **hf_mapping.hf_config_from_model(cfg))
        kwargs = {} if experts_implementation is None else {'experts_implementation': experts_implementation}
        with torch.device(device):  # HF's own random init, overwritten below, is fast there
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        fused = any(n.endswith('mlp.experts.gate_up_proj') for n, _ in model.named_parameters())
        state = hf_mapping.hf_from_params(variables['params'], variables.get('moe_bias'), cfg, fused_experts=fused)
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                                    strict=False)
        assert not unexpected and all(k.endswith('rotary_emb.inv_freq') for k in missing), (missing, unexpected)
        dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[cfg.dtype]
        self.autocast = device != 'cpu' and dtype != torch.float32
        self.model = model.to(device, torch.float32 if self.autocast else dtype).train()
        self.device, self.dtype = device, dtype
        self.experts = getattr(model.config, '_experts_implementation', None)
        self.attention = model.config._attn_implementation
        o = c.optim
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{'params': decay, 'weight_decay': o.weight_decay},
                                      {'params': no_decay, 'weight_decay': 0.0}],
                                     lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
        self.clip = o.clip_norm
        self.inputs = torch.from_numpy(host_batch['inputs'].astype(np.int64)).to(device)
        self.targets = torch.from_numpy(host_batch['targets'].astype(np.int64)).to(device)
        self.torch = torch

    def run(self, n: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(self.device, self.dtype, enabled=self.autocast):
                logits = self.model(input_ids=self.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.loss = loss.detach()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
        if self.device != 'cpu':
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n


class Timed:
    """fn() repeated, then sync(its last result): a side_by_side runner, run(n) -> seconds per call."""

    def __init__(self, fn, sync):
        self.fn, self.sync = fn, sync

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            out = self.fn()
        self.sync(out)
        return (time.perf_counter() - start) / n


def side_by_side(runners: dict, repeats: int, steps: int) -> dict:
    """Median seconds per step of each runner, rounds alternating between them."""
    for r in runners.values():
        r.run(1)  # warm-up (compiles / allocates)
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            times[k].append(r.run(steps))
    return {k: statistics.median(v) for k, v in times.items()}


def op_times(trace_dir) -> tuple[collections.Counter, int, int]:
    """({XLA op name: summed duration in ns}, busy ns, lanes) from a `jax.profiler.trace` directory.

    On a GPU: the device's kernels, each counted for the HLO op it runs (its 'hlo_op' stat; a kernel
    without one under its own name), busy = the union of their spans per stream, lanes = streams. On the
    CPU: the ops on XLA's worker threads, busy counting a thread busy inside an op or a parallel region,
    lanes = threads.
    """
    path = next(pathlib.Path(trace_dir).rglob('*.xplane.pb'))
    ops, busy, lanes = collections.Counter(), 0, 0
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        gpu = plane.name.startswith('/device:GPU')
        for line in plane.lines:
            if not (gpu and line.name.startswith('Stream')) and 'XLAEigen' not in line.name:
                continue
            lanes += 1
            spans, region = [], None
            for event in sorted(line.events, key=lambda e: e.start_ns):
                if event.name == 'ThreadpoolListener::StartRegion':
                    region = event.start_ns
                elif event.name == 'ThreadpoolListener::StopRegion' and region is not None:
                    spans.append((region, event.start_ns))
                    region = None
                elif not event.name.startswith(('ThunkExecutor', 'ThreadpoolListener', 'end:')):
                    op = dict(event.stats).get('hlo_op', event.name) if gpu else event.name
                    ops[str(op)] += event.duration_ns
                    spans.append((event.start_ns, event.start_ns + event.duration_ns))
            end = 0
            for a, b in sorted(spans):  # the union of the lane's busy spans
                busy += max(0, b - max(a, end))
                end = max(end, b)
    return ops, busy, lanes
