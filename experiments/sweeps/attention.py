"""Attention: MLA vs MHA vs GQA at matched parameters (v3_small, shrunk).

Claim (DeepSeek-V2 section 2.1 and appendix D): Multi-head Latent Attention caches only a compressed
latent (kv_lora_rank) plus one shared RoPE key (qk_rope_head_dim) per token and layer, a fraction of
MHA's 2 x heads x head_dim, and still models language better than MHA, while GQA/MQA save cache at a
cost in quality.

Run:      python -m dsjax.sweep --config=experiments/sweeps/attention.py --workdir=runs/sweeps/attention
Size:     v3_small at width 128, 4 heads, 4 layers (1 dense + 3 MoE), MTP off, 150 steps of 8 x 64 tokens,
          3 seeds: 9 runs, 27 minutes on 2 CPU cores shared with other jobs. Attention weights per
          layer are equal: MLA (q_lora 96, kv_lora 64, nope 32 + rope 16, v 32), MHA (4 heads x 36)
          and GQA (4 query heads, 2 kv heads, x 48) each hold 73,728 (the `params` column shows the
          whole model matches).
Expect:   KV cache per token (float32, 4 layers): MLA 1,280 B, GQA 3,072 B, MHA 4,608 B, i.e. MLA 28% of
          MHA (DeepSeek-V2 full size: 34,560 vs 1,966,080 values per token over 60 layers, 1.8%; our
          heads are few and narrow). Validation loss: at 150 steps and 4 heads the three are expected to
          lie within about one seed spread of each other; the V2 paper's quality gap needs its scale.
Measured: (benchmarks/results/sweeps/attention/report.md; 27 minutes, 158-202 s per run, the 2 cores
          shared with other jobs at load average 15-20)
          | variant          | val_loss      | kv_cache_bytes_per_token | params    |
          | MLA              | 6.176 ± 0.096 | 1,280                    | 3,922,688 |
          | MHA              | 6.344 ± 0.072 | 4,608                    | 3,922,048 |
          | GQA (2 kv heads) | 6.559 ± 0.061 | 3,072                    | 3,922,048 |
          Agrees with the claim, more clearly than expected: MLA < MHA < GQA in validation loss, each gap
          about two seed spreads (every MLA seed beats every MHA seed, every MHA seed every GQA seed),
          with 28% of MHA's cache. The order is set by step 50 and holds to 150, so this measures early
          training speed at matched weights; MLA also has two more RMSNorms (640 parameters).
"""


def get_sweep():
    return dict(
        base='experiments/v3_small.py:tiny',
        overrides={
            'model.num_nextn_predict_layers': 0,
            'train.mtp_loss_weight': 0.0,
            'train.mtp_loss_weight_final': 0.0,
            'train.progress_bar': False,
        },
        variants={
            'MLA': {},
            'MHA': {'model.attention_type': 'mha', 'model.num_key_value_heads': 4, 'model.head_dim': 36},
            'GQA (2 kv heads)': {'model.attention_type': 'mha', 'model.num_key_value_heads': 2, 'model.head_dim': 48},
        },
        seeds=[0, 1, 2],
        metrics=['val_loss', 'kv_cache_bytes_per_token', 'params'],
    )
