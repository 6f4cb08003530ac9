"""Multi-token prediction on vs off: validation loss of the main (next-token) head (v3_small, shrunk).

Claim (DeepSeek-V3 section 2.2 and table 4): one sequential MTP module (depth 1, loss weight lambda 0.3
then 0.1) densifies the training signal and improves the main model on most benchmarks at equal
inference cost, the module being dropped (or kept for speculative decoding) after training.

Run:      python -m dsjax.sweep --config=experiments/sweeps/mtp.py --workdir=runs/sweeps/mtp
Hardware: 2 CPU cores: 6 runs (2 variants x 3 seeds) of v3_small at width 128, 4 layers (1 dense + 3 MoE),
          150 steps of 8 x 64 tokens; ~20 minutes (estimated from the balancing sweep's ~3 minutes per
          run; the MTP runs cost more per step).
Expect:   not yet run here. At this scale the main head's validation loss with MTP should be about equal
          to, or slightly worse than, without it: the extra objective competes for a 4-million-parameter
          model's capacity, and DeepSeek's gains were measured on downstream benchmarks at 16B-671B
          parameters, not on the loss of a model this small.
Variants: MTP depth 1 (lambda 0.3, then 0.1) and no MTP.
"""


def get_sweep():
    return dict(
        base='experiments/v3_small.py:tiny',
        overrides={
            'train.progress_bar': False,
        },
        variants={
            # v3_small's schedule: lambda 0.3 for the first 70% of the steps, then 0.1.
            'MTP depth 1': {'model.num_nextn_predict_layers': 1, 'train.mtp_loss_weight': 0.3,
                            'train.mtp_loss_weight_final': 0.1},
            'no MTP': {'model.num_nextn_predict_layers': 0, 'train.mtp_loss_weight': 0.0,
                       'train.mtp_loss_weight_final': 0.0},
        },
        seeds=[0, 1, 2],
        metrics=['val_loss', 'params', 'activated_params'],
    )
