"""DeepSeek-V2 at laptop scale: v3_small's MLA backbone with V2's MoE recipe: 2 shared + 16 routed
experts (top-4), softmax gating with device-limited routing (4 groups, 2 kept, group score = max),
expert/device/communication balance losses (alpha 0.003/0.05/0.02), capacity-factor token dropping
in training (1.25, lowest gates first; never at evaluation), no MTP, no routing bias.

Run:      python -m dsjax.main --config=experiments/v2_small.py
Hardware: 2 CPU cores.
Expect:   not yet measured at full length.
Variants: `:smoke` shrinks everything to a seconds-long run (tests).
"""
from dsjax import presets


def get_config(arg=None):
    c = presets.load_experiment(__file__, 'v3_small', arg)
    m = c.model
    m.n_routed_experts = 16 if arg != 'smoke' else m.n_routed_experts
    m.n_shared_experts = 2 if arg != 'smoke' else 1
    m.scoring_func = 'softmax'
    m.topk_method = 'group_limited_greedy'
    m.norm_topk_prob = False
    m.routed_scaling_factor = 1.0
    m.aux_loss_alpha = 0.003
    m.seq_aux = False
    m.device_aux_alpha = 0.05
    m.comm_aux_alpha = 0.02
    m.capacity_factor = 1.25
    m.num_nextn_predict_layers = 0
    c.train.bias_update_rate = 0.0
    c.train.mtp_loss_weight = 0.0
    c.train.mtp_loss_weight_final = 0.0
    return c
