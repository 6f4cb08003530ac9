"""Expert granularity: few large vs many small routed experts at equal total and activated parameters.

Claim (DeepSeekMoE, Dai et al. 2024, section 3.1 and figure 4): splitting each expert into m smaller ones
and routing each token to m times as many keeps the computation and the parameters fixed but makes
far more expert combinations possible (C(64, 8) vs C(8, 1)), so experts specialise more finely and the
model reaches a lower loss.

Run:      python -m dsjax.sweep --config=experiments/sweeps/experts.py --workdir=runs/sweeps/experts
Hardware: 2 CPU cores: 12 runs (4 variants x 3 seeds) of v3_small at width 128, 4 layers (1 dense + 3 MoE),
          MTP off, no shared expert (its width would change with the granularity), 150 steps of 8 x 64
          tokens; ~40 minutes (estimated from the balancing sweep's ~3 minutes per run).
Expect:   not yet run here. Validation loss should fall with granularity (8 x 256 top-1 highest, 64 x 32
          top-8 lowest), by a margin that at 150 steps may be comparable to the seed spread; the routing
          bias keeps MaxVio low in every variant.
Variants: 8 x 256 top-1, 16 x 128 top-2, 32 x 64 top-4, 64 x 32 top-8: every variant has 2,048
          routed-expert units per layer of which 256 are activated per token (`activated_params` differ
          only by the router's 128 x E weights, +1.7% at 64 experts).
"""


def get_sweep():
    return dict(
        base='experiments/v3_small.py:tiny',
        overrides={
            'model.n_shared_experts': 0,
            'model.num_nextn_predict_layers': 0,
            'train.mtp_loss_weight': 0.0,
            'train.mtp_loss_weight_final': 0.0,
            'train.progress_bar': False,
        },
        # Group-limited routing stays as in v3_small (4 groups, 2 kept), so 8 experts means 2 per group.
        variants={
            '8 x 256, top-1': {'model.n_routed_experts': 8, 'model.num_experts_per_tok': 1,
                               'model.moe_intermediate_size': 256},
            '16 x 128, top-2': {'model.n_routed_experts': 16, 'model.num_experts_per_tok': 2,
                                'model.moe_intermediate_size': 128},
            '32 x 64, top-4': {'model.n_routed_experts': 32, 'model.num_experts_per_tok': 4,
                               'model.moe_intermediate_size': 64},
            '64 x 32, top-8': {'model.n_routed_experts': 64, 'model.num_experts_per_tok': 8,
                               'model.moe_intermediate_size': 32},
        },
        seeds=[0, 1, 2],
        metrics=['val_loss', 'maxvio_global', 'activated_params', 'params'],
    )
