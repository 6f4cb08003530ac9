"""Decode throughput on CPU: dsjax against HF transformers' `generate` on the same weights, plus MTP
speculative decoding, at batch 1 and 16 on a `v3_small`-shaped model.

Run: `python benchmarks/decode.py [--model=RUN_DIR]` (a few minutes on 2 CPU cores); prints a markdown
table and writes it to benchmarks/results/decode.md. With --model (a dsjax run of
experiments/v3_small.py) the weights and tokenizer are the run's and the prompts are Python source,
so the MTP drafts have something to get right; without it the weights are random (acceptance ~0).

Both sides decode greedily in float32 from the same prompts (PROMPT tokens each, no padding) for
exactly NEW tokens (no EOS stop), prefill included; tokens/s = batch x NEW / seconds, the best of
REPEATS runs (3 for HF) after a warm-up that compiles dsjax's programs: the 2 cores are shared with
other jobs, and the fastest run is the one they disturbed least. HF runs DeepseekV3ForCausalLM (its
MLA caches full per-head K and V; its MoE loops over the experts that received tokens) with the
torch threads it defaults to.
"""
import dataclasses
import inspect
import pathlib
import time

from absl import app, flags
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


def load_model():
    """(cfg, variables, tokenizer or None): the run's, or experiments/v3_small.py with random weights."""
    if _MODEL.value:
        loaded = loading.load(_MODEL.value)
        cfg, variables, tokenizer = loaded.cfg, loaded.variables, loaded.tokenizer
    else:
        c = presets.load_experiment(str(EXPERIMENT), 'v3_small').model
        cfg = config_lib.freeze_model(c)
        variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        variables, tokenizer = jax.tree.map(np.asarray, jax.tree.map(lambda x: x, _unbox(variables))), None
    if _DISPATCH.value:
        cfg = dataclasses.replace(cfg, moe_dispatch=_DISPATCH.value)
    return cfg, variables, tokenizer


def _unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


def prompts(tokenizer, vocab: int, batch: int) -> np.ndarray:
    """[batch, PROMPT] windows of Python source (the stdlib's), or random tokens without a tokenizer."""
    if tokenizer is None:
        return np.random.default_rng(0).integers(1, vocab, (batch, PROMPT)).astype(np.int32)
    import collections, json, statistics as st  # noqa: E401  (their source is the prompt text)
    text = ''.join(inspect.getsource(m) for m in (collections, json.decoder, st))
    ids = tokenizer.encode(text)
    stride = (len(ids) - PROMPT) // batch
    return np.stack([[tokenizer.bos_id] + ids[i * stride:i * stride + PROMPT - 1] for i in range(batch)]).astype(np.int32)


def hf_model(cfg, variables):
    """transformers' DeepseekV3ForCausalLM holding the same weights (the MTP module is not part of it)."""
    import torch
    import transformers
    main = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    config = transformers.CONFIG_MAPPING['deepseek_v3'](**hf_mapping.hf_config_from_model(main))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    fused = any(n.endswith('mlp.experts.gate_up_proj') for n, _ in model.named_parameters())
    state = hf_mapping.hf_from_params(variables['params'], variables.get('moe_bias'), main, fused_experts=fused)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith('rotary_emb.inv_freq') for k in missing), (missing, unexpected)
    model.generation_config.eos_token_id = None  # exactly NEW tokens, as on our side
    model.generation_config.pad_token_id = 0
    return model


def timed(fn, repeats=REPEATS):
    """(fastest of `repeats` runs in seconds, last result); a first run warms up (compiles)."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), result


def main(argv):
    del argv
    import torch
    cfg, variables, tokenizer = load_model()
    hf = hf_model(cfg, variables)
    rows = {}
    for batch in BATCHES:
        prompt = prompts(tokenizer, cfg.vocab_size, batch)
        lengths = np.full((batch,), PROMPT, np.int32)

        def ours():
            out = decode.generate(cfg, variables, prompt, lengths=lengths, max_new_tokens=NEW)
            return np.asarray(out.tokens)

        def spec():
            out, stats = speculative.generate_speculative(cfg, variables, prompt, lengths=lengths, max_new_tokens=NEW)
            return np.asarray(out.tokens), stats

        def theirs():
            with torch.no_grad():
                ids = torch.from_numpy(prompt.astype(np.int64))
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
            return out[:, PROMPT:].numpy()

        t_ours, tokens = timed(ours)
        t_hf, hf_tokens = timed(theirs, repeats=3)
        r = dict(ours=batch * NEW / t_ours, hf=batch * NEW / t_hf)
        # Tokens up to a row's first disagreement (float32 on both sides: only near-ties differ).
        agree = [np.argmin(np.append(a == b, False)) for a, b in zip(tokens, hf_tokens)]
        r['agree'] = sum(agree) / tokens.size
        if cfg.num_nextn_predict_layers:
            t_spec, (spec_tokens, stats) = timed(spec)
            assert np.array_equal(spec_tokens, tokens), 'speculative decoding must reproduce greedy decoding'
            r.update(spec=batch * NEW / t_spec, accept=stats['acceptance_rate'], per_step=stats['tokens_per_step'])
        rows[batch] = r
        print(batch, {k: round(v, 3) for k, v in r.items()}, flush=True)

    load = ' / '.join(f'{x:.1f}' for x in __import__('os').getloadavg())
    weights = f'trained run `{_MODEL.value}`' if _MODEL.value else 'random weights'
    per_token = cache_lib.bytes_per_token_per_layer(cfg) * cfg.num_hidden_layers
    hf_per_token = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    lines = [
        f'v3_small shape ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.n_routed_experts} experts top-'
        f'{cfg.num_experts_per_tok}, MLA r={cfg.kv_lora_rank}, vocab {cfg.vocab_size}; moe_dispatch='
        f'{cfg.moe_dispatch}), {weights}; greedy float32, {PROMPT}-token prompts, {NEW} new tokens, prefill '
        f'included. jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'transformers {__import__("transformers").__version__}; load average {load} on '
        f'{__import__("os").cpu_count()} cores.',
        '',
        '| batch | dsjax tok/s | HF generate tok/s | dsjax / HF | dsjax + MTP tok/s | speculative speed-up '
        '| drafts accepted | tokens per step | same tokens as HF |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for batch, r in rows.items():
        spec_cells = (f"{r['spec']:.0f} | {r['spec'] / r['ours']:.2f}x | {r['accept']:.0%} | {r['per_step']:.2f}"
                      if 'spec' in r else 'n/a | n/a | n/a | n/a')
        lines.append(f"| {batch} | {r['ours']:.0f} | {r['hf']:.0f} | {r['ours'] / r['hf']:.1f}x | {spec_cells} "
                     f"| {r['agree']:.0%} |")
    lines += ['', f'Cache per token (all {cfg.num_hidden_layers} layers, float32): dsjax {per_token} bytes '
              f'(latent + roped key), HF {hf_per_token} bytes (per-head K and V), {hf_per_token / per_token:.0f}x.']
    table = '\n'.join(lines)
    print('\n' + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text('# Decode benchmark\n\n' + table + '\n')


if __name__ == '__main__':
    app.run(main)
