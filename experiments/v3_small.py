"""DeepSeek-V3 at laptop scale, every V3 feature on, pre-trained on the Python standard library.

MLA (query and kv compression, decoupled RoPE), DeepSeekMoE with 1 shared + 32 fine-grained routed
experts (top-4), sigmoid gating with group-limited routing (4 groups, 2 kept), auxiliary-loss-free
bias balancing (gamma 1e-2, see below), sequence-wise balance loss (alpha 1e-4), one MTP depth (lambda 0.3 then
0.1), YaRN-ready RoPE (interleaved pairs as in the checkpoints; see v3_long.py to extend).

Run:      python -m dsjax.main --config=experiments/v3_small.py
Hardware: 2 CPU cores: 300 steps x 8 x 256 tokens in 6.0 minutes on the nearly idle machine, start to end.
Expect:   validation loss 8.38 -> 5.48 (100) -> 4.84 (200) -> 4.66 (300), global MaxVio 0.70 (measured on
          today's code; another seed moves the final loss by ~0.5%). experiments/sweeps/balancing.py compares the
          balancing methods over three seeds. History: benchmarks/results/history.md.
Variants: `:smoke` (seconds, tests), `:nobias` (sequence-wise loss only), `:nobalance` (neither),
          `:tiny` (width 128, 4 layers, 150 steps of 8 x 64 tokens: the ablation sweeps' size).
"""
from dsjax import presets


def get_config(arg=None):
    # llm_small's vocabulary, data and warmup; its own width and schedule; V3's architecture on top.
    c = presets.load_experiment(__file__, 'llm_small')
    m = c.model
    m.hidden_size = 256
    m.intermediate_size = 688
    m.num_hidden_layers = 6
    m.attention_type = 'mla'
    m.q_lora_rank = 96
    m.kv_lora_rank = 64
    m.qk_nope_head_dim = 32
    m.qk_rope_head_dim = 16
    m.v_head_dim = 32
    m.rope_interleave = True
    m.n_routed_experts = 32
    m.n_shared_experts = 1
    m.num_experts_per_tok = 4
    m.moe_intermediate_size = 128
    m.first_k_dense_replace = 1
    m.scoring_func = 'sigmoid'
    m.topk_method = 'noaux_tc'
    m.n_group = 4
    m.topk_group = 2
    m.norm_topk_prob = True
    m.routed_scaling_factor = 2.5
    m.aux_loss_alpha = 1e-4
    m.seq_aux = True
    # Capacity dispatch costs what the activated experts cost (dense computes all 32 for every token);
    # overflow beyond 2x the balanced share is dropped in training only (counted as `dropped`), never
    # at evaluation. Bias balancing keeps it near zero; set capacity_factor=0 for strictly dropless.
    m.moe_dispatch = 'capacity'
    m.capacity_factor = 2.0
    m.num_nextn_predict_layers = 1
    c.data.batch_size = 8
    c.train.steps = 300
    c.optim.lr = 2e-3
    # V3 used gamma 1e-3 over ~10^6 steps. A 300-step run at lr 2e-3 sees its routers collapse in
    # the first 20 steps (MaxVio ~5); the bias moves at most gamma per step, so it needs 1e-2 to
    # catch up: after 60 steps global MaxVio 1.85 with 1e-2 against 3.74 with 1e-3 (and 3.7 with 0).
    c.train.bias_update_rate = 1e-2
    c.train.bias_update_until = 1.0
    c.train.mtp_loss_weight = 0.3
    c.train.mtp_loss_weight_final = 0.1
    c.train.mtp_weight_switch = 0.7
    variants = set((arg or '').split(','))
    if 'nobias' in variants or 'nobalance' in variants:
        c.train.bias_update_rate = 0.0
    if 'nobalance' in variants:
        m.aux_loss_alpha = 0.0
    if 'tiny' in variants:
        # The ablation sweeps' size (experiments/sweeps/): about 3 minutes per run on 2 CPU cores.
        m.hidden_size, m.intermediate_size, m.moe_intermediate_size, m.num_hidden_layers = 128, 344, 64, 4
        c.data.seq_len = 64
        c.train.steps = 150
        c.optim.warmup_steps = 15
        c.train.eval_every, c.train.checkpoint_every = 50, 150
    if 'smoke' in variants:
        presets.smoke(c)
    return c
