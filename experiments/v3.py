"""DeepSeek-V3 (671B total, 37B activated) at true size: MLA, 1 shared + 256 routed experts (top-8),
sigmoid gating with node-limited routing (8 groups, 4 kept), auxiliary-loss-free bias balancing
(gamma 0.001, off for the last 500B tokens), sequence-wise balance loss 1e-4, one MTP depth
(lambda 0.3 then 0.1).

Builds abstractly here (tests/test_experiments.py); trains on a pod with expert parallelism.
Recipe (V3 paper 4.1-4.2): AdamW (0.9, 0.95), wd 0.1, clip 1.0; lr warmed up over 2K steps to 2.2e-4, held
until 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B (optim schedule
'phases'); 14.8T tokens at 4K context, packed without a cross-document mask, FIM (PSM) on 10% of documents;
AdamW's moments kept in bfloat16 (paper 3.3). The batch grows from 3,072 to 15,360 sequences over the first 469B
tokens (data.batch_ramp_*) by whole micro-batches of 512 sequences (train.micro_batches 30; one sequence per device
of v5p-1024's 512): 15,640 ramp steps, 243,425 in all (235,240 at a flat 15,360); gamma's and lambda's switches
fall at the steps of 14.3T and 10T tokens. Long context follows as a separate stage (YaRN, 32K then 128K).
Variants: `:smoke`; another data.batch_size needs --config.data.batch_ramp_start=0 --config.train.micro_batches=1
(or a ramp in its own micro-batches).
"""
from dsjax import presets
from dsjax.data import batch_ramp

BATCH, TOKENS = 15360, 14_800_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_v3', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1, expert=64))
    m = c.model
    m.remat_policy = 'full'
    m.moe_dispatch = 'expert_parallel'
    # Expert-parallel buffers of 2x the balanced load (moe.expert_parallel_buffers): 1.8% of assignments
    # dropped at a trained v3_small's routing, 12% at 1.25 (benchmarks/results/aot.md).
    m.capacity_factor = 2.0
    c.optim.update(lr=2.2e-4, schedule='phases', warmup_steps=2000, phase_ends=(10e12, 14.3e12, 14.633e12, 14.8e12),
                   phase_shapes=('constant', 'cosine', 'constant', 'constant'),
                   phase_factors=(1.0, 0.1, 0.1, 7.3e-6 / 2.2e-4), moment_dtype='bfloat16')
    c.data.update(fim_rate=0.1, document_mask=False, batch_ramp_start=3072, batch_ramp_tokens=469e9)
    c.train.micro_batches = 30
    ramp = batch_ramp.from_config(c.data, c.train.micro_batches)
    c.train.steps = c.optim.decay_steps = ramp.steps_for(TOKENS)
    c.train.bias_update_rate = 0.001
    c.train.bias_update_until = ramp.steps_for(14.3e12) / c.train.steps
    c.train.mtp_loss_weight = 0.3
    c.train.mtp_loss_weight_final = 0.1
    c.train.mtp_weight_switch = ramp.steps_for(10e12) / c.train.steps
    return presets.variant(c, arg)
