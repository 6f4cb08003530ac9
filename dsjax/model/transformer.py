"""The decoder: embeddings, a scanned dense stack, a scanned MoE stack, final norm and head, MTP.

Axis legend: B batch, L length, D model width, V vocab, E routed experts, M MoE layers.
`Transformer.apply(variables, tokens)` returns (logits [B, L, V] float32, aux) where aux holds
`balance_loss` (scalar), `load` ({stack name: tokens per expert, [M, E] or [E]}), `dropped`,
`hidden` (pre-norm final hidden state) and, with MTP, `mtp_logits` [D, B, L, V].
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import rope
from dsjax.model.attention import MHA, MLA, attention_mask
from dsjax.model.layers import MLP, Embed, RMSNorm, constrain, weight
from dsjax.model.moe import MoE

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + ffn(norm(.)) with a dense MLP or MoE."""
    cfg: ModelConfig
    use_moe: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, mask_BxLxL, token_mask_BxL):
        cfg = self.cfg
        attn = MLA(cfg, name='attn') if cfg.attention_type == 'mla' else MHA(cfg, name='attn')
        h_BxLxD = x_BxLxD + attn(RMSNorm(cfg, name='input_norm')(x_BxLxD), cos, sin, mask_BxLxL)
        normed = RMSNorm(cfg, name='post_attn_norm')(h_BxLxD)
        if self.use_moe:
            y_BxLxD, aux = MoE(cfg, name='mlp')(normed, token_mask_BxL, self.deterministic)
        else:
            y_BxLxD, aux = MLP(cfg, name='mlp')(normed), {}
        out = constrain(h_BxLxD + y_BxLxD, ('batch', 'act_len', 'act_embed'))
        return out, aux


class Stack(nn.Module):
    """`length` identical Blocks, scanned (one compiled body), with the configured remat."""
    cfg: ModelConfig
    use_moe: bool
    length: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, mask_BxLxL, token_mask_BxL):
        block = Block
        if self.cfg.remat_policy != 'none':
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[self.cfg.remat_policy])
        scanned = nn.scan(
            block,
            variable_axes={'params': 0, 'moe_bias': 0},
            split_rngs={'params': True},
            in_axes=(nn.broadcast,) * 4,
            length=self.length,
            metadata_params={nn.PARTITION_NAME: 'layers'},
        )
        return scanned(self.cfg, self.use_moe, self.deterministic, name='layers')(
            x_BxLxD, cos, sin, mask_BxLxL, token_mask_BxL)


class MTPLayer(nn.Module):
    """One multi-token-prediction depth: h' = W[enorm(emb(t_{i+k})); hnorm(h_i)], then a full block."""
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxLxD, emb_BxLxD, cos, sin, mask_BxLxL, token_mask_BxL):
        cfg = self.cfg
        d = cfg.hidden_size
        # The checkpoint's order is [embedding; hidden] (the paper's eq. 21 writes the reverse).
        both = jnp.concatenate([RMSNorm(cfg, name='enorm')(emb_BxLxD), RMSNorm(cfg, name='hnorm')(h_BxLxD)], -1)
        x_BxLxD = jnp.einsum('BLX,XD->BLD', both, weight(self, 'eh_proj', (2 * d, d), (None, 'embed'), cfg))
        return Block(cfg, use_moe=cfg.num_moe_layers > 0, deterministic=self.deterministic, name='block')(
            x_BxLxD, cos, sin, mask_BxLxL, token_mask_BxL)


class Transformer(nn.Module):
    """DeepSeek-LLM (dense), DeepSeek-V2 and DeepSeek-V3, chosen by the config's fields."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, next_tokens_BxL=None,
                 deterministic: bool = True):
        """Forward pass. `next_tokens` (the targets) feeds MTP; without it MTP sees shifted inputs."""
        cfg = self.cfg
        b, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((b, length), jnp.int32)
        cos, sin = rope.cos_sin(positions_BxL, cfg)
        mask_BxLxL = attention_mask(segment_ids_BxL)
        token_mask_BxL = segment_ids_BxL != 0

        embed = Embed(cfg, name='embed')
        x_BxLxD = embed(tokens_BxL)
        if cfg.tie_word_embeddings:
            unembed = embed.attend
        else:
            head_DxV = weight(self, 'lm_head', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), cfg)
            unembed = lambda x: jnp.einsum('BLD,DV->BLV', x, head_DxV)

        def head(h_BxLxD, norm_name):
            """Logits in float32 from a pre-norm hidden state."""
            logits = unembed(RMSNorm(cfg, name=norm_name)(h_BxLxD))
            return constrain(logits, ('batch', 'act_len', 'act_vocab')).astype(jnp.float32)

        args = (cos, sin, mask_BxLxL, token_mask_BxL)
        aux = {'balance_loss': jnp.zeros((), jnp.float32), 'load': {}, 'dropped': jnp.zeros((), jnp.float32)}
        if cfg.num_dense_layers:
            x_BxLxD, _ = Stack(cfg, False, cfg.num_dense_layers, deterministic, name='dense_layers')(x_BxLxD, *args)
        if cfg.num_moe_layers:
            x_BxLxD, moe_aux = Stack(cfg, True, cfg.num_moe_layers, deterministic, name='moe_layers')(x_BxLxD, *args)
            aux['balance_loss'] += moe_aux['balance_loss'].sum()
            aux['load']['moe_layers'] = moe_aux['load']
            aux['dropped'] = moe_aux['dropped'].mean()
        aux['hidden'] = x_BxLxD
        logits = head(x_BxLxD, 'final_norm')

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
            aux['mtp_logits'] = jnp.stack(mtp_logits)
        return logits, aux
