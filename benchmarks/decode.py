"""Decode throughput: dsjax against HF transformers' `generate`, plus MTP speculative decoding.

Run: `python benchmarks/decode.py [--model=RUN_DIR]` (a few minutes on 2 CPU cores); prints a markdown
table and writes it to benchmarks/results/decode.md. The model is `v3_small`-shaped, at batch 1 and 16.
With --model (a dsjax run of experiments/v3_small.py) the weights and tokenizer are the run's and the
prompts are Python source, so the MTP drafts have something to get right; without it the weights are
random (acceptance ~0). benchmarks/device.py runs `compare` at V2-Lite size on a GPU (part 'decode').

Both sides decode greedily from the same prompts (PROMPT tokens each, no padding) for exactly NEW tokens
(no EOS stop), prefill included; tokens/s = batch x NEW / seconds, the best of REPEATS runs (3 for HF)
after a warm-up that compiles dsjax's programs: the 2 cores are shared with other jobs, and the fastest
run is the one they disturbed least. On the CPU both run in float32 on the same weights, so the tokens
can be compared. HF runs DeepseekV3ForCausalLM (DeepseekV2 for V2 models: MLA caching full per-head K
and V; its MoE runs the experts that received tokens) with the torch threads it defaults to.
"""
import dataclasses
import inspect
import pathlib
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import presets
from dsjax.infer import cache as cache_lib
from dsjax.infer import decode, loading, speculative
from dsjax.interop import hf_mapping
from dsjax.model.transformer import Transformer

PROMPT, NEW, BATCHES, REPEATS = 32, 64, (1, 16), 5
RESULTS = pathlib.Path(__file__).parent / 'results' / 'decode.md'
EXPERIMENT = pathlib.Path(__file__).parents[1] / 'experiments' / 'v3_small.py'

_MODEL = flags.DEFINE_string('model', None, 'A dsjax run of experiments/v3_small.py (default: random weights).')
_DISPATCH = flags.DEFINE_string('moe_dispatch', None, "Override the config's MoE dispatch (e.g. 'dense').")


def init_variables(cfg, seed: int = 0):
    """Random variables of `cfg`'s Transformer, unboxed, on the default device."""
    return nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)))


def load_model():
    """(cfg, variables, tokenizer or None): the run's, or experiments/v3_small.py with random weights."""
    if _MODEL.value:
        loaded = loading.load(_MODEL.value)
        cfg, variables, tokenizer = loaded.cfg, loaded.variables, loaded.tokenizer
    else:
        cfg = config_lib.freeze_model(presets.load_experiment(str(EXPERIMENT), 'v3_small').model)
        variables, tokenizer = jax.tree.map(np.asarray, init_variables(cfg)), None
    if _DISPATCH.value:
        cfg = dataclasses.replace(cfg, moe_dispatch=_DISPATCH.value)
    return cfg, variables, tokenizer


def prompts(tokenizer, vocab: int, batch: int, length: int = PROMPT) -> np.ndarray:
    """[batch, length] windows of Python source (the stdlib's), or random tokens without a tokenizer."""
    if tokenizer is None:
        return np.random.default_rng(0).integers(1, vocab, (batch, length)).astype(np.int32)
    import collections, json, statistics as st  # noqa: E401  (their source is the prompt text)
    text = ''.join(inspect.getsource(m) for m in (collections, json.decoder, st))
    ids = tokenizer.encode(text)
    stride = (len(ids) - length) // batch
    return np.stack([[tokenizer.bos_id] + ids[i * stride:i * stride + length - 1]
                     for i in range(batch)]).astype(np.int32)


def hf_model(cfg, variables=None, device: str = 'cpu'):
    """transformers' model of `cfg` (without the MTP module, which it lacks) on `device` in cfg.dtype:
    holding `variables`' weights, or with its own random initialisation when None (made on the device)."""
    import torch
    import transformers
    main = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    hf = hf_mapping.hf_config_from_model(main)
    config = transformers.CONFIG_MAPPING[hf['model_type']](**hf)
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[cfg.dtype]
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if variables is not None:
        fused = any(n.endswith('mlp.experts.gate_up_proj') for n, _ in model.named_parameters())
        state = hf_mapping.hf_from_params(variables['params'], variables.get('moe_bias'), main, fused_experts=fused)
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                                    strict=False)
        assert not unexpected and all(k.endswith('rotary_emb.inv_freq') for k in missing), (missing, unexpected)
    model.generation_config.eos_token_id = None  # exactly NEW tokens, as on our side
    model.generation_config.pad_token_id = 0
    return model


def timed(fn, repeats=REPEATS, warmup=None):
    """(fastest of `repeats` runs in seconds, last result); `warmup` (default fn) runs first (compiles)."""
    result = (warmup or fn)()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), result


def compare(cfg, variables, hf, batches, prompt_len: int, new: int, tokenizer=None, repeats: int = REPEATS,
            device: str = 'cpu', same_weights: bool = True) -> dict:
    """{batch: row} of tokens/s for dsjax, HF generate and (with MTP) dsjax speculative decoding; with
    `same_weights` (hf holds `variables`) also the share of tokens both produce before they first differ."""
    import torch
    rows = {}
    for batch in batches:
        prompt = prompts(tokenizer, cfg.vocab_size, batch, prompt_len)
        lengths = np.full((batch,), prompt_len, np.int32)

        def ours():
            return np.asarray(decode.generate(cfg, variables, prompt, lengths=lengths, max_new_tokens=new).tokens)

        def spec():
            out, stats = speculative.generate_speculative(cfg, variables, prompt, lengths=lengths, max_new_tokens=new)
            return np.asarray(out.tokens), stats

        def theirs(n=new):
            with torch.no_grad():
                ids = torch.from_numpy(prompt.astype(np.int64)).to(device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
            if device == 'cuda':
                torch.cuda.synchronize()
            return out[:, prompt_len:].cpu().numpy()

        t_ours, tokens = timed(ours, repeats)
        t_hf, hf_tokens = timed(theirs, max(1, min(repeats, 3)), warmup=lambda: theirs(2))
        r = dict(ours=batch * new / t_ours, hf=batch * new / t_hf)
        r['agree'] = first_divergence(tokens, hf_tokens).sum() / tokens.size if same_weights else None
        if cfg.num_nextn_predict_layers:
            t_spec, (spec_tokens, stats) = timed(spec, repeats)
            r.update(spec=batch * new / t_spec, accept=stats['acceptance_rate'], per_step=stats['tokens_per_step'],
                     spec_same=bool(np.array_equal(spec_tokens, tokens)))
        rows[batch] = r
        print(batch, r, flush=True)
    return rows


def first_divergence(a_BxN, b_BxN) -> np.ndarray:
    """Per row, the number of tokens before the first position where the two differ (N if none)."""
    differ = np.asarray(a_BxN) != np.asarray(b_BxN)
    return np.where(differ.any(1), differ.argmax(1), differ.shape[1])


def cache_bytes(cfg, batch: int, length: int) -> tuple[int, int]:
    """(dsjax's cache, HF's) for `length` slots per row; HF caches per-head K and V in every layer (for MLA
    keys of qk width and values of v width)."""
    ours = cache_lib.cache_bytes(jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, length)))
    if cfg.attention_type == 'mla':
        heads, widths = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        heads, widths = cfg.num_key_value_heads, 2 * cfg.attn_head_dim
    theirs = cfg.num_hidden_layers * heads * widths * jnp.dtype(cfg.dtype).itemsize * batch * length
    return ours, theirs


def table(cfg, rows: dict, prompt_len: int, new: int, weights: str) -> list[str]:
    import torch
    import transformers
    lines = [
        f'{cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.n_routed_experts} experts top-'
        f'{cfg.num_experts_per_tok}, MLA r={cfg.kv_lora_rank}, vocab {cfg.vocab_size}; moe_dispatch '
        f'{cfg.moe_dispatch}; {weights}; greedy {cfg.dtype}, {prompt_len}-token prompts, {new} new tokens, '
        f'prefill included. jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}, '
        f'transformers {transformers.__version__}.',
        '',
        '| batch | dsjax tok/s | HF generate tok/s | dsjax / HF | dsjax + MTP tok/s | speculative speed-up '
        '| drafts accepted | tokens per step | same tokens as HF | cache dsjax | cache HF |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for batch, r in rows.items():
        spec_cells = (f"{r['spec']:.0f} | {r['spec'] / r['ours']:.2f}x | {r['accept']:.0%} | {r['per_step']:.2f}"
                      if 'spec' in r else 'n/a | n/a | n/a | n/a')
        ours, theirs = cache_bytes(cfg, batch, prompt_len + new)
        agree = 'n/a' if r['agree'] is None else f"{r['agree']:.0%}"
        lines.append(f"| {batch} | {r['ours']:.0f} | {r['hf']:.0f} | {r['ours'] / r['hf']:.1f}x | {spec_cells} "
                     f"| {agree} | {ours / 2 ** 20:.4g} MiB | {theirs / 2 ** 20:.4g} MiB |")
    return lines


def speculative_check(cfg, batch: int, prompt_len: int, new: int) -> dict:
    """Speculative against plain greedy decoding of random prompts (random weights): rows identical, share of
    tokens before each row's first divergence, the largest top-1 minus top-2 teacher-forced logit at a
    divergence (0 when none), drafts accepted."""
    variables = init_variables(cfg)
    prompt = prompts(None, cfg.vocab_size, batch, prompt_len)
    greedy = np.asarray(decode.generate(cfg, variables, prompt, max_new_tokens=new).tokens)
    spec, stats = speculative.generate_speculative(cfg, variables, prompt, max_new_tokens=new)
    spec = np.asarray(spec.tokens)
    agree = first_divergence(greedy, spec)
    margin = 0.0
    if (agree < new).any():
        logits, _ = jax.jit(Transformer(cfg).apply)(variables, np.concatenate([prompt, greedy], axis=1))
        for row in np.nonzero(agree < new)[0]:
            top2 = np.sort(np.asarray(logits[row, prompt_len - 1 + agree[row]], np.float32))[-2:]
            margin = max(margin, float(top2[1] - top2[0]))
    return dict(identical=int((agree == new).sum()), agree=agree.sum() / greedy.size, margin=margin,
                accept=stats['acceptance_rate'])


def main(argv):
    del argv
    cfg, variables, tokenizer = load_model()
    rows = compare(cfg, variables, hf_model(cfg, variables), BATCHES, PROMPT, NEW, tokenizer)
    for r in rows.values():
        assert r.get('spec_same', True), 'speculative decoding must reproduce greedy decoding'
    load = ' / '.join(f'{x:.1f}' for x in __import__('os').getloadavg())
    weights = f'trained run `{_MODEL.value}`' if _MODEL.value else 'random weights'
    lines = table(cfg, rows, PROMPT, NEW, weights)
    lines += ['', f'Load average {load} on {__import__("os").cpu_count()} cores.']
    text = '\n'.join(lines)
    print('\n' + text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text('# Decode benchmark\n\n' + text + '\n')


if __name__ == '__main__':
    app.run(main)
