"""Attention: MLA vs MHA vs GQA at matched parameters (v3_small, shrunk).

Claim (DeepSeek-V2 section 2.1 and appendix D): Multi-head Latent Attention caches only a compressed
latent (kv_lora_rank) plus one shared RoPE key (qk_rope_head_dim) per token and layer, a fraction of
MHA's 2 x heads x head_dim, and still models language better than MHA, while GQA/MQA save cache at a
cost in quality.

Run:      python -m dsjax.sweep --config=experiments/sweeps/attention.py --workdir=runs/sweeps/attention
Hardware: 2 CPU cores: 9 runs (3 variants x 3 seeds) of v3_small at width 128, 4 heads, 4 layers (1 dense
          + 3 MoE), MTP off, 150 steps of 8 x 64 tokens; 27 minutes with the cores shared with other jobs
          (158-202 s per run, load average 15-20).
Expect:   (measured; benchmarks/results/sweeps/attention/report.md)
          | variant          | val_loss      | kv_cache_bytes_per_token | params    |
          | MLA              | 6.176 ± 0.096 | 1,280                    | 3,922,688 |
          | MHA              | 6.344 ± 0.072 | 4,608                    | 3,922,048 |
          | GQA (2 kv heads) | 6.559 ± 0.061 | 3,072                    | 3,922,048 |
          Agrees with the claim: MLA < MHA < GQA in validation loss, each gap about two seed spreads
          (every MLA seed beats every MHA seed, every MHA seed every GQA seed), with 28% of MHA's cache
          (DeepSeek-V2 at full size: 1.8%; our heads are few and narrow). The order is set by step 50 and
          holds to 150, so this measures early training speed at matched weights.
Variants: MLA (q_lora 96, kv_lora 64, nope 32 + rope 16, v 32), MHA (4 heads x 36), GQA (4 query heads,
          2 kv heads, x 48): equal attention weights per layer (73,728; MLA also has two more RMSNorms,
          640 parameters). `--print` emits one command per run.
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
