"""Experiment helpers: full-size model presets, the `:smoke` shrink, loading one experiment file from
another. Every default is still `config.base_config()`'s; these only override fields of it."""
import importlib.util
import pathlib

import ml_collections

from dsjax import config as config_lib

_V3_YARN = dict(type='yarn', factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                mscale=1.0, mscale_all_dim=1.0)
_V2_YARN = dict(_V3_YARN, mscale=0.707, mscale_all_dim=0.707)
_MLA = dict(attention_type='mla', kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            rope_interleave=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
            initializer_range=0.006)

# Full-size architectures, as in DeepSeek's papers and released config.json files (spec section 5).
MODEL_PRESETS = {
    'deepseek_llm_7b': dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    'deepseek_llm_67b': dict(vocab_size=102400, hidden_size=8192, intermediate_size=22016, num_hidden_layers=95,
                             num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    'deepseek_v2': dict(_MLA, vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_hidden_layers=60,
                        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
                        n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1536,
                        first_k_dense_replace=1, scoring_func='softmax', topk_method='group_limited_greedy',
                        n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0,
                        aux_loss_alpha=0.003, device_aux_alpha=0.05, comm_aux_alpha=0.02,
                        rope_scaling=_V2_YARN),
    'deepseek_v2_lite': dict(_MLA, vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=0,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             moe_intermediate_size=1408, first_k_dense_replace=1, scoring_func='softmax',
                             topk_method='greedy', n_group=1, topk_group=1, norm_topk_prob=False,
                             routed_scaling_factor=1.0, aux_loss_alpha=0.001, rope_scaling=_V2_YARN),
    'deepseek_v3': dict(_MLA, vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
                        first_k_dense_replace=3, scoring_func='sigmoid', topk_method='noaux_tc', n_group=8,
                        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=0.0001,
                        seq_aux=True, num_nextn_predict_layers=1, rope_scaling=_V3_YARN),
}

# DeepSeekMoE 16B (DeepSeekMoE paper; deepseek-ai/deepseek-moe-16b-base config.json): MHA, 2 shared + 64 routed
# experts (top-6), the first layer dense; init std 0.006 and expert-level balance 0.001 as the paper trained it.
MODEL_PRESETS['deepseek_moe_16b'] = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
    first_k_dense_replace=1, scoring_func='softmax', topk_method='greedy', norm_topk_prob=False,
    routed_scaling_factor=1.0, aux_loss_alpha=0.001, initializer_range=0.006)

# The R1-Distill checkpoints as released (their config.json on the Hub, deepseek-ai/DeepSeek-R1-Distill-*): Qwen2.5
# bases carry q/k/v biases, Llama-3.x bases llama3 RoPE scaling. All six untie the head, 131,072 positions.
_QWEN2 = dict(qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=131072)
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
MODEL_PRESETS.update({
    'r1_distill_qwen_1_5b': dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 rms_norm_eps=1e-6, rope_theta=10000.0),
    'r1_distill_qwen_7b': dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               rms_norm_eps=1e-6, rope_theta=10000.0),
    'r1_distill_qwen_14b': dict(_QWEN2, vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                                rms_norm_eps=1e-5, rope_theta=1000000.0),
    'r1_distill_qwen_32b': dict(_QWEN2, vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                rms_norm_eps=1e-5, rope_theta=1000000.0),
    'r1_distill_llama_8b': dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32),
    'r1_distill_llama_70b': dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64),
})


def apply_preset(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Sets `c.model` (and data.vocab_size through its reference) to a full-size architecture."""
    preset = dict(MODEL_PRESETS[name])
    c.model.rope_scaling.update(**preset.pop('rope_scaling', {}))
    c.model.update(**preset)
    return c


def full_size_pretraining(preset: str, *, batch: int, tokens: int, mesh: dict) -> ml_collections.ConfigDict:
    """A true-size pre-training run as DeepSeek did it: the preset architecture at 4K context with plain
    RoPE (YaRN comes with the long-context stage), bf16 compute, steps from the token budget, a pod mesh."""
    c = apply_preset(config_lib.base_config(), preset)
    c.model.rope_scaling.type = 'none'
    c.model.max_position_embeddings = 4096
    c.model.dtype = 'bfloat16'
    c.data.seq_len = 4096
    c.data.batch_size = batch
    c.train.steps = tokens // (batch * c.data.seq_len)
    c.mesh.update(**mesh)
    return c


# R1's distillation data: ~800K samples (600K reasoning, 200K other) of R1-era models, never released; the paper
# gives no epochs or learning rate for the students, so these follow V3's SFT (paper 5.1): 2 epochs, cosine
# 5e-6 -> 1e-6, packed with sample masking.
R1_SAMPLES, R1_EPOCHS = 800_000, 2


def r1_distill_sft(preset: str, *, base: str, tokenizer: str, batch: int, mesh: dict, arg=None
                   ) -> ml_collections.ConfigDict:
    """R1's distillation of `preset` at true size (R1 paper 2.4: SFT only, no RL): the student architecture as
    released, started from its base checkpoint `base` (a Hub id or a directory), trained on the teacher's
    samples in the released tokenizer's chat template (`tokenizer`: the R1-Distill repository, whose
    tokenizer_config.json holds DeepSeek's template and special tokens) at 32K context. `:smoke` is a tiny
    Qwen2/Llama-shaped student on the built-in cold-start set, from scratch, with no download."""
    c = apply_preset(config_lib.base_config(), preset)
    c.stage = 'sft'
    c.init.checkpoint = base
    c.data.update(tokenizer='hf', tokenizer_path=tokenizer, seq_len=32768, batch_size=batch)
    c.sft.source = 'cold_start'  # R1's samples were not released: pass yours with sft.source=jsonl, sft.paths
    c.model.update(dtype='bfloat16', remat_policy='full')
    c.optim.update(lr=5e-6, schedule='cosine', min_lr_ratio=0.2, warmup_steps=100, weight_decay=0.1)
    c.train.steps = R1_EPOCHS * R1_SAMPLES // batch
    c.optim.decay_steps = c.train.steps
    c.mesh.update(**mesh)
    if arg == 'smoke':
        variant(c, arg)
        c.init.checkpoint = ''
        c.data.update(tokenizer='sentencepiece', tokenizer_path='', seq_len=512)
        c.model.max_position_embeddings = 512
        c.sft.update(examples=16, val_examples=8)
    return c


def variant(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
    """Applies a full-size file's `:smoke` variant: tiny sizes on whatever devices there are."""
    if arg == 'smoke':
        smoke(c)
        c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any experiment to a few-second run (tests, CI): same features, tiny sizes."""
    m = c.model
    m.vocab_size = 512
    m.hidden_size = 64
    m.intermediate_size = 128
    gqa = m.num_key_value_heads != m.num_attention_heads
    m.num_attention_heads = 4
    m.num_key_value_heads = 2 if gqa else 4
    m.num_hidden_layers = 2
    m.head_dim = 0
    m.max_position_embeddings = 256
    if m.attention_type == 'mla':
        m.q_lora_rank = 32 if m.q_lora_rank else 0
        m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 32, 16, 8, 16
    if m.n_routed_experts:
        m.n_routed_experts = 8
        m.num_experts_per_tok = 2
        m.moe_intermediate_size = 32
        m.n_shared_experts = min(m.n_shared_experts, 1)
        m.first_k_dense_replace = min(m.first_k_dense_replace, 1)
        m.num_hidden_layers = m.first_k_dense_replace + 2
        if m.n_group > 1:
            m.n_group, m.topk_group = 4, 2
    c.data.seq_len = 32
    c.data.batch_size = 8
    if c.train.micro_batches > 1 or c.data.batch_ramp_start:
        # Accumulation in 2 micro-batches of 8 (one row per device of 8); V3's ramp from 1 to 2 of them,
        # over the first 1.5 batches of tokens: 3 steps at 8 rows, then 16.
        c.data.batch_size = 16
        c.train.micro_batches = 2
        if c.data.batch_ramp_start:
            c.data.update(batch_ramp_start=8, batch_ramp_tokens=1.5 * 16 * 32)
    c.data.val_fraction = 0.05
    c.train.steps = 4
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.eval_batches = 1
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.optim.decay_steps = c.train.get_ref('steps') + 0
    return c


def chain_evaluation(stages, tasks) -> ml_collections.ConfigDict:
    """A chain's `evaluation` section: each named stage answers 512 held-out problems of `tasks` greedily in
    the chat template (accuracy, format rate) and is scored on their worked solutions' cross-entropy.
    `gap=(low, high)`, two of the stages, adds the share of the accuracy gap between them each stage closes."""
    return ml_collections.ConfigDict(dict(stages=tuple(stages), tasks=tasks, problems=512, template='chat',
                                          max_new_tokens=64, batch_size=128, val_loss=True, seq_len=256, gap=()))


def load_experiment(caller_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment file `name`.py beside `caller_file` (a stage's base run)."""
    path = pathlib.Path(caller_file).with_name(f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'dsjax_experiment_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
