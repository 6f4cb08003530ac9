"""The decoder: embeddings, a scanned dense stack, a scanned MoE stack, final norm and head, MTP.

Axis legend: B batch, L length, D model width, V vocab, E routed experts, M MoE layers.
`Transformer.apply(variables, tokens)` returns (logits [B, L, V] float32, aux) where aux holds
`balance_loss` (scalar), `load` ({stack name: tokens per expert, [M, E] or [E]}), `dropped`,
`hidden` (pre-norm final hidden state) and, with MTP, `mtp_logits` [D, B, L, V] (`apply_head=False`:
normed hidden states instead of logits, for losses.head_cross_entropy).

Cached decoding: pass `cache` ({stack name: {entry: [layers, B, S, ...]}}, see dsjax/infer/cache.py)
and the tokens' `positions`; aux['cache'] holds it updated. MTP does not run then: `MTPDraft` runs
it on its own cache, once the tokens it needs are known (speculative decoding).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import rope
from dsjax.model.attention import ATTENTION_RESIDUALS, MHA, MLA
from dsjax.model.layers import MLP, Embed, RMSNorm, constrain, dense, weight
from dsjax.model.moe import EXPERT_RESIDUALS, MoE

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    # Matmul outputs: the dots without batch axes (not attention's [L, S] scores) and the routed experts' GEMMs.
    'save_dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(*EXPERT_RESIDUALS)),
    'save_attention': jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS),
}


def resolve_remat(cfg: ModelConfig, backend: str | None = None) -> str:
    """The policy behind `cfg.remat_policy`: 'auto' is 'save_attention' on the CPU, where recomputing a
    layer's projections and MLP in the backward costs less than the scan stacking and re-reading their
    saved activations, but recomputing the attention does not; else 'none'."""
    if cfg.remat_policy != 'auto':
        return cfg.remat_policy
    return 'save_attention' if (backend or jax.default_backend()) == 'cpu' else 'none'


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + ffn(norm(.)) with a dense MLP or MoE.

    With `cache` (this layer's) the attention reads and extends it (only extends it with `fresh_cache`,
    see attention.MLA); aux['cache'] holds it updated.
    """
    cfg: ModelConfig
    use_moe: bool
    deterministic: bool = True
    absorb: bool = True
    fresh_cache: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, token_mask_BxL, cache=None, positions_BxL=None):
        cfg = self.cfg
        attn = (MLA(cfg, self.absorb, self.fresh_cache, name='attn') if cfg.attention_type == 'mla'
                else MHA(cfg, self.fresh_cache, name='attn'))
        normed = RMSNorm(cfg, name='input_norm')(x_BxLxD)
        if cache is None:
            h_BxLxD = x_BxLxD + attn(normed, cos, sin, segment_ids_BxL)
        else:
            attended, cache = attn(normed, cos, sin, segment_ids_BxL, cache, positions_BxL)
            h_BxLxD = x_BxLxD + attended
        normed = RMSNorm(cfg, name='post_attn_norm')(h_BxLxD)
        if self.use_moe:
            y_BxLxD, aux = MoE(cfg, name='mlp')(normed, token_mask_BxL, self.deterministic)
        else:
            y_BxLxD, aux = MLP(cfg, name='mlp')(normed), {}
        out = constrain(h_BxLxD + y_BxLxD, ('batch', 'act_len', 'act_embed'))
        if cache is not None:
            aux = {**aux, 'cache': cache}
        return out, aux


class Stack(nn.Module):
    """`length` identical Blocks, scanned (one compiled body), with the configured remat.

    A cache is scanned with the layers: each Block reads its [B, S, ...] slice of the [layers, B, S, ...]
    arrays, and aux['cache'] stacks the updated slices back.
    """
    cfg: ModelConfig
    use_moe: bool
    length: int
    deterministic: bool = True
    absorb: bool = True
    fresh_cache: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, token_mask_BxL, cache=None, positions_BxL=None):
        block = Block
        policy = resolve_remat(self.cfg)
        if policy != 'none':
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[policy])
        scanned = nn.scan(
            block,
            variable_axes={'params': 0, 'moe_bias': 0},
            split_rngs={'params': True},
            in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast),
            length=self.length,
            metadata_params={nn.PARTITION_NAME: 'layers'},
        )
        return scanned(self.cfg, self.use_moe, self.deterministic, self.absorb, self.fresh_cache, name='layers')(
            x_BxLxD, cos, sin, segment_ids_BxL, token_mask_BxL, cache, positions_BxL)


class MTPLayer(nn.Module):
    """One multi-token-prediction depth: h' = W[enorm(emb(t_{i+k})); hnorm(h_i)], then a full block."""
    cfg: ModelConfig
    deterministic: bool = True
    absorb: bool = True

    @nn.compact
    def __call__(self, h_BxLxD, emb_BxLxD, cos, sin, segment_ids_BxL, token_mask_BxL, cache=None, positions_BxL=None):
        cfg = self.cfg
        d = cfg.hidden_size
        # The checkpoint's order is [embedding; hidden] (the paper's eq. 21 writes the reverse).
        both = jnp.concatenate([RMSNorm(cfg, name='enorm')(emb_BxLxD), RMSNorm(cfg, name='hnorm')(h_BxLxD)], -1)
        # eh_proj stays out of FP8 (model.fp8), as DeepSeek's FP8 checkpoint keeps it in BF16 with the head
        # and embedding; the MTP block's GEMMs are FP8 like every block's (stored E4M3 with block scales).
        x_BxLxD = dense(both, weight(self, 'eh_proj', (2 * d, d), (None, 'embed'), cfg))
        block = Block(cfg, use_moe=cfg.num_moe_layers > 0, deterministic=self.deterministic, absorb=self.absorb,
                      name='block')
        return block(x_BxLxD, cos, sin, segment_ids_BxL, token_mask_BxL, cache, positions_BxL)


def _head_weight(module: nn.Module, cfg: ModelConfig, embed: Embed) -> jax.Array:
    """The output head [D, V] in the compute dtype: lm_head, or the embedding's transpose when tied."""
    if cfg.tie_word_embeddings:
        return embed.embedding.T.astype(cfg.dtype)
    return weight(module, 'lm_head', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), cfg)


def _output_head(module: nn.Module, cfg: ModelConfig, embed: Embed, apply_head: bool = True):
    """head(h, norm_name): float32 logits of a pre-norm hidden state, through the (maybe tied) head;
    with `apply_head` False only the normed state. Also returns the head [D, V]."""
    head_DxV = _head_weight(module, cfg, embed)

    def head(h_BxLxD, norm_name):
        normed_BxLxD = RMSNorm(cfg, name=norm_name)(h_BxLxD)
        if not apply_head:
            return normed_BxLxD
        logits = dense(normed_BxLxD, head_DxV)
        return constrain(logits, ('batch', 'act_len', 'act_vocab')).astype(jnp.float32)
    return head, head_DxV


class Transformer(nn.Module):
    """DeepSeek-LLM (dense), DeepSeek-V2 and DeepSeek-V3, chosen by the config's fields.

    `absorb` picks the MLA attention of cached calls: absorbed weights (default) or naive expansion.
    `fresh_cache`: the cache holds nothing before these tokens (a prefill from position 0), so they attend
    to each other with the training kernels and only write the cache (attention.MLA).
    """
    cfg: ModelConfig
    absorb: bool = True
    fresh_cache: bool = False

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, next_tokens_BxL=None,
                 deterministic: bool = True, cache=None, apply_head: bool = True):
        """Forward pass. `next_tokens` (the targets) feeds MTP; without it MTP sees shifted inputs.

        `apply_head=False` (training through losses.head_cross_entropy, which applies the head chunk by
        chunk) returns the normed final hidden state [B, L, D] in place of the logits, aux['head'] the
        output head [D, V], and aux['mtp_hidden'] [depths, B, L, D] in place of aux['mtp_logits'].

        With `cache`, the tokens sit at `positions` (default 0..L-1) and attend to the cache, not to
        each other by segment; `segment_ids` then only marks padding (0) for the MoE.
        """
        cfg = self.cfg
        b, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((b, length), jnp.int32)
        cos, sin = rope.cos_sin(positions_BxL, cfg)
        token_mask_BxL = segment_ids_BxL != 0

        embed = Embed(cfg, name='embed')
        x_BxLxD = embed(tokens_BxL)
        head, head_DxV = _output_head(self, cfg, embed, apply_head)

        args = (cos, sin, segment_ids_BxL, token_mask_BxL)
        aux = {'balance_loss': jnp.zeros((), jnp.float32), 'load': {}, 'dropped': jnp.zeros((), jnp.float32)}
        new_cache = None if cache is None else dict(cache)
        for name, use_moe, length in (('dense_layers', False, cfg.num_dense_layers),
                                      ('moe_layers', True, cfg.num_moe_layers)):
            if not length:
                continue
            stack = Stack(cfg, use_moe, length, deterministic, self.absorb, self.fresh_cache, name=name)
            if cache is None:
                x_BxLxD, stack_aux = stack(x_BxLxD, *args)
            else:
                x_BxLxD, stack_aux = stack(x_BxLxD, *args, cache[name], positions_BxL)
                new_cache[name] = stack_aux['cache']
            if use_moe:
                aux['balance_loss'] += stack_aux['balance_loss'].sum()
                aux['load']['moe_layers'] = stack_aux['load']
                aux['dropped'] = stack_aux['dropped'].mean()
        aux['hidden'] = x_BxLxD
        if not apply_head:
            aux['head'] = head_DxV
        logits = head(x_BxLxD, 'final_norm')
        if cache is not None:
            aux['cache'] = new_cache
            return logits, aux

        if cfg.num_nextn_predict_layers:
            if next_tokens_BxL is None:
                next_tokens_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))
            h_BxLxD, mtp_logits = x_BxLxD, []
            for depth in range(cfg.num_nextn_predict_layers):
                # Depth k (0-based here) combines h_i with the embedding of token i+k+1.
                shifted = jnp.pad(next_tokens_BxL[:, depth:], ((0, 0), (0, depth)))
                layer = MTPLayer(cfg, deterministic, name=f'mtp_{depth}')
                h_BxLxD, mtp_aux = layer(h_BxLxD, embed(shifted), *args)
                if mtp_aux:
                    aux['balance_loss'] += mtp_aux['balance_loss']
                    aux['load'][f'mtp_{depth}'] = mtp_aux['load']
                mtp_logits.append(head(h_BxLxD, f'mtp_{depth}_norm'))
            aux['mtp_logits' if apply_head else 'mtp_hidden'] = jnp.stack(mtp_logits)
        return logits, aux


class MTPDraft(nn.Module):
    """MTP depth 0 on its own, with its cache: drafts the token after next for speculative decoding.

    Reads the Transformer's own variables (the same names: embed, mtp_0, mtp_0_norm, lm_head). At
    position i it combines the main model's pre-norm hidden state h_i with the embedding of token
    i+1 and returns logits for token i+2, plus the cache with 'mtp_0' updated.
    """
    cfg: ModelConfig
    absorb: bool = True

    @nn.compact
    def __call__(self, hidden_BxLxD, next_tokens_BxL, positions_BxL, token_mask_BxL, cache):
        cfg = self.cfg
        if not cfg.num_nextn_predict_layers:
            raise ValueError('MTPDraft needs model.num_nextn_predict_layers >= 1 (this model has no MTP module)')
        cos, sin = rope.cos_sin(positions_BxL, cfg)
        embed = Embed(cfg, name='embed')
        layer = MTPLayer(cfg, absorb=self.absorb, name='mtp_0')
        h_BxLxD, aux = layer(hidden_BxLxD, embed(next_tokens_BxL), cos, sin, None, token_mask_BxL,
                             cache['mtp_0'], positions_BxL)
        logits = _output_head(self, cfg, embed)[0](h_BxLxD, 'mtp_0_norm')
        return logits, {**cache, 'mtp_0': aux['cache']}
