"""Experiment configs: every field's default (`base_config`) and valid values, validation that names the
field, and the frozen model config. The bottom of dsjax: it imports no other dsjax module."""
import dataclasses
import math

from absl import logging
import jax
import ml_collections
import numpy as np

ATTENTION_TYPES = ('mha', 'mla')
SCORING_FUNCS = ('softmax', 'sigmoid')
TOPK_METHODS = ('greedy', 'group_limited_greedy', 'noaux_tc')
MOE_DISPATCHES = ('auto', 'dense', 'capacity', 'grouped', 'ragged', 'expert_parallel')
REMAT_POLICIES = ('auto', 'none', 'full', 'save_dots', 'save_attention')
ATTENTION_IMPLS = ('auto', 'xla', 'blocked', 'cudnn', 'splash')
FUSED_ATTENTION_DTYPES = ('bfloat16', 'float16')  # compute dtypes the cudnn attention kernel takes
DTYPES = ('float32', 'bfloat16', 'float16')
ROPE_SCALING_TYPES = ('none', 'yarn', 'llama3')
STAGES = ('pretrain', 'sft', 'reward', 'dpo', 'rejection', 'distill', 'grpo')
SOURCES = ('stdlib', 'text', 'jsonl', 'tasks', 'array_record')
TOKENIZERS = ('sentencepiece', 'hf')
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
NONFINITE_POLICIES = ('stop', 'skip')
SCHEDULES = ('cosine', 'multistep', 'constant', 'phases')
PHASE_SHAPES = ('constant', 'cosine')
MOMENT_DTYPES = ('float32', 'bfloat16')
# Verifiable tasks (dsjax/data/tasks.py) and their difficulty levels: arithmetic level L joins an L-digit
# and an (L-1)-digit operand (level 1: two 1-digit ones), or an L-digit and a one-digit factor (as
# multiplication level L does); countdown gives `level` numbers.
TASK_LEVELS = {'arithmetic': (1, 2, 3, 4, 5, 6), 'multiplication': (2, 3, 4, 5, 6), 'countdown': (2, 3, 4, 5)}


def base_config() -> ml_collections.ConfigDict:
    """Every field dsjax reads, with its default; experiment files start here and override."""
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'

    c.model = m = ml_collections.ConfigDict()
    # Field names follow HF transformers' Llama / DeepseekV2 / DeepseekV3 configs.
    m.vocab_size = 8192
    m.hidden_size = 256
    m.intermediate_size = 688
    m.num_hidden_layers = 4
    m.num_attention_heads = 4
    m.num_key_value_heads = 4
    m.head_dim = 0  # 0: hidden_size // num_attention_heads (MHA/GQA only)
    m.rms_norm_eps = 1e-6
    m.rope_theta = 10000.0
    m.rope_interleave = False  # True: rotate pairs (x[2i], x[2i+1]) as DeepSeek-V2/V3 checkpoints do
    m.max_position_embeddings = 4096
    # type 'yarn' (DeepSeek-V2/V3: beta_*, mscale*) or 'llama3' (Llama-3.1+: *_freq_factor); both stretch
    # the original context by `factor`.
    m.rope_scaling = ml_collections.ConfigDict(dict(
        type='none', factor=1.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0, low_freq_factor=1.0, high_freq_factor=4.0))
    m.attention_type = 'mha'
    m.qkv_bias = False  # MHA/GQA: biases on the q, k and v projections (Qwen2); o never has one
    m.q_lora_rank = 0  # 0: a single q projection (V2-Lite)
    m.kv_lora_rank = 0
    m.qk_nope_head_dim = 0
    m.qk_rope_head_dim = 0
    m.v_head_dim = 0
    m.n_routed_experts = 0  # 0: every layer dense
    m.n_shared_experts = 0
    m.num_experts_per_tok = 0
    m.moe_intermediate_size = 0
    m.first_k_dense_replace = 0
    m.scoring_func = 'softmax'
    m.topk_method = 'greedy'
    m.n_group = 1
    m.topk_group = 1
    m.norm_topk_prob = False
    m.routed_scaling_factor = 1.0
    m.aux_loss_alpha = 0.0  # V2 expert-level alpha1, or V3 sequence-wise alpha (seq_aux)
    m.seq_aux = False  # True: V3 sequence-wise balance loss on normalised sigmoid scores
    m.device_aux_alpha = 0.0  # V2 alpha2 (groups stand for devices)
    m.comm_aux_alpha = 0.0  # V2 alpha3
    # 'auto': capacity when capacity_factor > 0, else dropless: ragged (tokamax grouped GEMMs) on GPU and TPU,
    # grouped on the CPU; see moe.resolve_dispatch and benchmarks/results/moe_dispatch.md, moe_flops.md.
    # Evaluation and decoding never drop: 'gather' (the selected experts' weights only) when T x K <= E.
    m.moe_dispatch = 'auto'
    m.capacity_factor = 0.0  # capacity dispatch only; 0: no token is ever dropped
    # V2: the tokens of ~this share of training sequences (every round(1 / share)-th row) are never dropped:
    # they take capacity first, before any other token, highest gate first among them (capacity dispatches).
    m.never_drop_fraction = 0.0
    m.num_nextn_predict_layers = 0
    m.tie_word_embeddings = False
    m.initializer_range = 0.02
    m.dtype = 'float32'  # compute
    m.param_dtype = 'float32'
    # What a layer saves for the backward: 'none' everything, 'full' only its input (the rest is recomputed),
    # 'save_dots' the matmul outputs, 'save_attention' its input plus the blocked attention's output and
    # logsumexp (so the backward recomputes the projections but not the attention); 'auto': save_attention
    # on the CPU (cheaper than storing and re-reading all residuals there: README, Performance), none
    # elsewhere. See transformer.resolve_remat.
    m.remat_policy = 'auto'
    # Training-time attention kernel. 'xla': einsums and a float32 softmax over the whole [L, S] scores;
    # 'blocked': the same per block of queries, skipping the keys above the causal diagonal; 'cudnn': the
    # fused flash kernel (GPU, bf16/fp16 compute; MLA's unequal widths from Hopper on); 'auto': cudnn where
    # it applies on a GPU, blocked on the CPU, else xla. See attention.resolve_impl.
    m.attention_impl = 'auto'
    # FP8 training as DeepSeek-V3 (dsjax/model/fp8.py): every linear GEMM in the blocks (attention and MLA
    # projections, dense MLP, shared and routed experts) and its two backward GEMMs on E4M3 operands,
    # activations per 1 x 128 tile, weights per 128 x 128 block; embedding, head, router, norms, attention
    # core and the MTP projection stay in the compute dtype.
    m.fp8 = False

    c.data = d = ml_collections.ConfigDict()
    d.source = 'stdlib'
    d.paths = ()
    d.jsonl_field = 'text'
    d.val_fraction = 0.02
    d.seq_len = 256
    d.batch_size = 16
    # V3's batch ramp: sequences per step grow from batch_ramp_start to batch_size over the first batch_ramp_tokens
    # tokens, by whole micro-batches (train.micro_batches; dsjax/data/batch_ramp.py); 0: batch_size throughout.
    d.batch_ramp_start = 0
    d.batch_ramp_tokens = 0.0
    d.fim_rate = 0.0  # share of training documents rearranged for fill-in-the-middle, PSM order (V3: 0.1)
    # True: packed documents never attend to each other (segment ids); False: a row is one sequence, as V3 packed.
    d.document_mask = True
    d.tokenizer = 'sentencepiece'  # or 'hf': a checkpoint's tokenizer.json (DeepSeek's byte-level BPE)
    d.tokenizer_path = ''  # sentencepiece: '' trains one on the corpus; hf: tokenizer.json or its directory
    d.vocab_size = m.get_ref('vocab_size')
    d.cache_dir = ''
    d.shuffle_seed = 0
    # Packed rows are shuffled within windows of this many rows (1: stream order). Without it a batch
    # is a few consecutive pieces of one or two files, and llm_small learns several times slower.
    d.shuffle_window = 1024
    d.max_doc_chars = 200_000
    d.tasks = ('arithmetic:2',)  # source 'tasks': worksheet pages of these task:level entries' train problems
    d.task_documents = 20000  # source 'tasks': pages generated
    d.worked_fraction = 1.0  # source 'tasks': share of tagged solutions that show their steps (else the result)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 3e-4
    o.schedule = 'cosine'
    o.warmup_steps = 100
    o.min_lr_ratio = 0.1
    o.milestones = (0.8, 0.9)
    o.milestone_factors = (0.316, 0.1)
    # schedule 'phases' (V3): phase i runs until phase_ends[i] tokens trained, 'constant' at lr x phase_factors[i]
    # or 'cosine' down to it (optim._phases).
    o.phase_ends = ()
    o.phase_shapes = ()
    o.phase_factors = ()
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.moment_dtype = 'float32'  # AdamW's two moments; V3 kept them in 'bfloat16' (optim.scale_by_adam)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    # Gradient accumulation: data.batch_size rows in this many micro-batches, one update equal to the whole
    # batch's; micro-batch m holds rows m, m + M, ... (dsjax/train/step.py). Every stage but grpo (own batches).
    t.micro_batches = 1
    # The schedule's length follows train.steps (an override of either moves both) until set itself.
    o.decay_steps = t.get_ref('steps') + 0
    t.seed = 0
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = 8
    t.checkpoint_every = 500
    t.keep_checkpoints = 2
    t.async_checkpoint = True
    # A NaN/Inf loss or gradient norm: 'stop' exits (the last good checkpoint stays the latest);
    # 'skip' drops that step's update, counts it (metric `nonfinite_skips`) and trains on.
    t.nonfinite_policy = 'stop'
    t.bias_update_rate = 0.0  # gamma of auxiliary-loss-free balancing; 0 turns it off
    t.bias_update_until = 1.0  # fraction of steps after which gamma is 0 (V3: 14.3T of 14.8T tokens)
    t.mtp_loss_weight = 0.0  # lambda
    t.mtp_loss_weight_final = 0.0  # lambda after mtp_weight_switch (V3: 0.3 then 0.1)
    t.mtp_weight_switch = 1.0  # fraction of steps
    t.progress_bar = True
    t.peak_flops = 0.0  # matmul FLOP/s for MFU; 0 measures this machine's at start-up

    c.init = i = ml_collections.ConfigDict()
    i.checkpoint = ''  # params from a previous stage's workdir/checkpoint dir, or a HF checkpoint directory

    # Post-training stages (dsjax/posttrain/); task lists hold 'task:level' entries (dsjax/data/tasks.py).
    c.sft = s = ml_collections.ConfigDict()
    s.source = 'jsonl'  # or 'cold_start': worked <think>/<answer> solutions of generated task problems
    s.paths = ()  # JSONL conversation files (source 'jsonl')
    s.tasks = ('arithmetic:2',)  # source 'cold_start'
    s.examples = 2000  # cold-start conversations per task entry
    s.val_examples = 100  # held-out (test-split) conversations per task entry
    s.system = ''  # a system prompt put before every conversation ('' for none)
    s.template = 'chat'  # or 'zero': one-question conversations in the R1-Zero template
    s.seed = 0

    c.reward = r = ml_collections.ConfigDict()
    r.tasks = ('arithmetic:2',)  # preference pairs: a correct against an incorrect answer
    r.pairs = 2000  # training pairs per task entry
    r.val_pairs = 200  # held-out (test-split) pairs per task entry
    r.margin = 0.0
    r.seed = 0

    c.dpo = dp = ml_collections.ConfigDict()  # DeepSeek-LLM Chat's DPO after SFT (dsjax/posttrain/dpo.py)
    dp.tasks = ('arithmetic:2',)  # preference pairs as the reward stage's: worked solution against a wrong one
    dp.pairs = 2000  # training pairs per task entry
    dp.val_pairs = 200  # held-out (test-split) pairs per task entry
    dp.beta = 0.1
    dp.seed = 0

    c.rejection = rj = ml_collections.ConfigDict()
    rj.tasks = ('arithmetic:2',)  # prompts from the train split
    rj.prompts = 500  # per task entry
    rj.samples = 4  # k answers per prompt
    rj.temperature = 1.0
    rj.top_p = 1.0
    rj.max_new_tokens = 96
    rj.max_tokens = 96  # keep only answers of at most this many tokens (EOS included)
    rj.batch = 64  # prompts per generate call
    rj.template = 'chat'  # 'chat' (dsjax/data/chat.py) or 'zero' (the R1-Zero template)
    rj.keep = 'correct'  # or 'all': every answer that ended in time (student samples for distillation)
    rj.seed = 0

    c.distill = ds = ml_collections.ConfigDict()
    ds.teacher = ''  # the teacher's run directory (a dsjax checkpoint); same tokenizer as the student
    ds.beta = 0.5  # generalised JSD: 0 forward KL, 1 reverse KL
    ds.temperature = 1.0
    ds.ce_weight = 0.0  # plus this times the cross-entropy on the data's own completions

    # Field names follow TRL's GRPOConfig where one exists (README: GRPO fields and TRL's).
    c.grpo = g = ml_collections.ConfigDict()
    g.source = 'tasks'  # or 'jsonl': the prompt rows of grpo.paths
    g.tasks = ('arithmetic:2',)  # source 'tasks': prompts from the train split, evaluation on the test split
    # Source 'jsonl': one row per line, {"prompt": "..."} or {"messages": [...]} (ending on a user turn), plus
    # any fields a reward function reads; rows are held out for evaluation by a hash, as data.val_fraction says.
    g.paths = ()
    g.template = 'zero'  # 'zero': the R1-Zero template (dsjax/data/tasks.py); 'chat': the SFT chat template
    g.batch_size = 512  # completions per batch: prompts per batch x num_generations
    g.num_generations = 16  # G
    g.max_completion_length = 48  # tokens, EOS included
    g.temperature = 1.0  # sampling, and the T of log_softmax(logits / T) in the loss
    g.top_p = 1.0
    g.num_iterations = 1  # mu, optimizer steps per batch; above 1 the ratio uses the log-probs stored at rollout
    g.beta = 0.001  # k3 KL to the frozen initial policy; 0 skips the reference forward pass
    g.epsilon = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    g.epsilon_high = 0.28
    g.eps_std = 1e-4  # advantages: (r - mean) / (std + eps_std) within each group
    # 'grpo': mean over sequences of each one's token mean; 'dapo': mean over all completion tokens;
    # 'dr_grpo': sum over tokens / (completions x max_completion_length).
    g.loss_type = 'grpo'
    # Rule rewards of dsjax/posttrain/rewards.py by name, or any function by import path, 'module:function'
    # or 'path/to/file.py:function', called as f(prompts, completions, **fields of the rows) -> floats.
    g.reward_funcs = ('accuracy', 'format')
    g.reward_weights = (1.0, 1.0)
    g.reward_model = ''  # reward 'reward_model': a reward-model run directory (stage 'reward')
    g.overlong_buffer = 8  # reward 'length': its penalty ramps over the last this many tokens
    g.eval_problems = 512  # held-out problems per task entry (source 'jsonl': at most this many held-out rows)
    g.eval_temperature = 0.0  # 0: greedy; the R1 paper's protocol is 0.6 with top-p 0.95 and k samples
    g.eval_top_p = 1.0
    g.eval_samples = 1  # k completions per held-out problem: accuracy is their mean (pass@1), plus pass@k

    c.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1: all devices not used by the other axes
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    return c


class ConfigError(ValueError):
    """A config field holds a value dsjax cannot use."""


def fail(field: str, value, valid: str):
    raise ConfigError(f'config.{field}={value!r} is invalid: {valid}')


def _check(ok: bool, field: str, value, valid: str):
    if not ok:
        fail(field, value, valid)


def _positive_int(c, field: str):
    value = c
    for part in field.split('.'):
        value = value[part]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
           'must be a positive integer')
    return value


def _choice(value, field: str, choices):
    _check(value in choices, field, value, f'must be one of {choices}')


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(default) -> str:
    if isinstance(default, bool):
        return 'a bool'
    if isinstance(default, int):
        return 'an int'
    return {float: 'a number', str: 'a string', tuple: 'a tuple'}[type(default)]


# Fields renamed to TRL's GRPOConfig names: a config that still sets the old name is told the new one.
RENAMED = {'grpo.group_size': 'grpo.num_generations', 'grpo.max_new_tokens': 'grpo.max_completion_length',
           'grpo.updates_per_batch': 'grpo.num_iterations', 'grpo.eps_low': 'grpo.epsilon',
           'grpo.eps_high': 'grpo.epsilon_high', 'grpo.aggregation': 'grpo.loss_type',
           'grpo.reward_names': 'grpo.reward_funcs'}


def _check_known(c, defaults) -> None:
    """Every field of every section is one base_config knows: a misspelt or renamed field set in an
    experiment file would otherwise be silently ignored."""
    for section in defaults.keys():
        if not isinstance(defaults[section], ml_collections.ConfigDict) or section not in c:
            continue
        for key in c[section].keys():
            field = f'{section}.{key}'
            if key not in defaults[section]:
                fail(field, c[section][key], f'renamed to config.{RENAMED[field]}' if field in RENAMED else
                     f'unknown field; the fields of config.{section} are {sorted(defaults[section].keys())}')


def _check_types(section, defaults, prefix: str) -> None:
    """Every field of `section` known to `defaults` has its default's type: a None or a bool where a
    number belongs (ConfigDict lets both through) fails here, not deep inside the run."""
    for key in defaults.keys():
        if key not in section:
            continue
        value, default, field = section[key], defaults[key], f'{prefix}.{key}' if prefix else key
        if isinstance(default, ml_collections.ConfigDict):
            _check(isinstance(value, (dict, ml_collections.ConfigDict)), field, value, 'must be a section')
            _check_types(value, default, field)
        elif isinstance(default, bool):
            _check(isinstance(value, bool), field, value, 'must be a bool')
        elif isinstance(default, int):
            _check(isinstance(value, int) and not isinstance(value, bool), field, value, 'must be an int')
        elif isinstance(default, float):
            _check(_real(value), field, value, 'must be a number')
        elif isinstance(default, str):
            _check(isinstance(value, str), field, value, 'must be a string')
        elif isinstance(default, tuple):
            _check(isinstance(value, (tuple, list)), field, value, 'must be a tuple')
            # An empty default (data.paths) says nothing about its elements; those are checked by name.
            if default:
                element = _type_name(default[0])
                for x in value:
                    _check(_real(x) if element == 'a number' else isinstance(x, type(default[0])), field, value,
                           f'every element must be {element}')


def validate_model(m) -> None:
    """Raises ConfigError naming the first bad model field."""
    _check_types(m, base_config().model, 'model')
    for f in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
              'max_position_embeddings'):
        _positive_int({'model': m}, f'model.{f}')
    _choice(m.attention_type, 'model.attention_type', ATTENTION_TYPES)
    _choice(m.dtype, 'model.dtype', DTYPES)
    _choice(m.param_dtype, 'model.param_dtype', DTYPES)
    _choice(m.remat_policy, 'model.remat_policy', REMAT_POLICIES)
    _choice(m.attention_impl, 'model.attention_impl', ATTENTION_IMPLS)
    if m.attention_impl == 'cudnn':
        _check(jax.default_backend() == 'gpu', 'model.attention_impl', m.attention_impl,
               f"needs a GPU (this backend is {jax.default_backend()}); use 'auto' or 'xla'")
        _check(m.dtype in FUSED_ATTENTION_DTYPES, 'model.attention_impl', m.attention_impl,
               f"needs model.dtype in {FUSED_ATTENTION_DTYPES}, not {m.dtype}")
    _check(m.rms_norm_eps > 0, 'model.rms_norm_eps', m.rms_norm_eps, 'must be > 0')
    _check(m.rope_theta > 0, 'model.rope_theta', m.rope_theta, 'must be > 0')
    _check(m.initializer_range > 0, 'model.initializer_range', m.initializer_range, 'must be > 0')
    _check(not m.qkv_bias or m.attention_type == 'mha', 'model.qkv_bias', m.qkv_bias,
           "q/k/v biases belong to attention_type='mha' (Qwen2); MLA has none")
    if m.attention_type == 'mha':
        _check(m.num_key_value_heads > 0 and m.num_attention_heads % m.num_key_value_heads == 0,
               'model.num_key_value_heads', m.num_key_value_heads,
               f'must divide num_attention_heads={m.num_attention_heads}')
        _check(m.head_dim > 0 or m.hidden_size % m.num_attention_heads == 0, 'model.head_dim',
               m.head_dim, 'set it, or make hidden_size divisible by num_attention_heads')
        if m.head_dim:
            _check(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'must be even (RoPE rotates pairs)')
    else:
        for f in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
            _positive_int({'model': m}, f'model.{f}')
        _check(m.qk_rope_head_dim % 2 == 0, 'model.qk_rope_head_dim', m.qk_rope_head_dim,
               'must be even (RoPE rotates pairs)')
        _check(m.q_lora_rank >= 0, 'model.q_lora_rank', m.q_lora_rank, 'must be >= 0 (0: no q compression)')
    rs = m.rope_scaling
    _choice(rs.type, 'model.rope_scaling.type', ROPE_SCALING_TYPES)
    if rs.type == 'yarn':
        _check(rs.factor > 1, 'model.rope_scaling.factor', rs.factor, 'must be > 1 for YaRN')
        _check(rs.original_max_position_embeddings > 0,
               'model.rope_scaling.original_max_position_embeddings',
               rs.original_max_position_embeddings, 'must be > 0')
        _check(rs.beta_fast > rs.beta_slow > 0, 'model.rope_scaling.beta_fast', rs.beta_fast,
               f'must exceed beta_slow={rs.beta_slow} > 0')
    if rs.type == 'llama3':
        _check(rs.factor >= 1, 'model.rope_scaling.factor', rs.factor, 'must be >= 1 for llama3 scaling')
        _check(rs.original_max_position_embeddings > 0, 'model.rope_scaling.original_max_position_embeddings',
               rs.original_max_position_embeddings, 'must be > 0')
        _check(rs.high_freq_factor > rs.low_freq_factor > 0, 'model.rope_scaling.high_freq_factor',
               rs.high_freq_factor, f'must exceed low_freq_factor={rs.low_freq_factor} > 0')
    if m.n_routed_experts:
        _positive_int({'model': m}, 'model.num_experts_per_tok')
        _positive_int({'model': m}, 'model.moe_intermediate_size')
        _check(m.num_experts_per_tok <= m.n_routed_experts, 'model.num_experts_per_tok',
               m.num_experts_per_tok, f'must be <= n_routed_experts={m.n_routed_experts}')
        _choice(m.scoring_func, 'model.scoring_func', SCORING_FUNCS)
        _choice(m.topk_method, 'model.topk_method', TOPK_METHODS)
        _choice(m.moe_dispatch, 'model.moe_dispatch', MOE_DISPATCHES)
        _positive_int({'model': m}, 'model.n_group')
        _check(m.n_routed_experts % m.n_group == 0, 'model.n_group', m.n_group,
               f'must divide n_routed_experts={m.n_routed_experts}')
        _check(1 <= m.topk_group <= m.n_group, 'model.topk_group', m.topk_group,
               f'must be in [1, n_group={m.n_group}]')
        per_group = m.n_routed_experts // m.n_group
        _check(m.topk_group * per_group >= m.num_experts_per_tok, 'model.topk_group', m.topk_group,
               f'topk_group x experts per group ({per_group}) must be >= num_experts_per_tok='
               f'{m.num_experts_per_tok}')
        if m.topk_method == 'noaux_tc':
            _check(m.scoring_func == 'sigmoid', 'model.scoring_func', m.scoring_func,
                   "topk_method='noaux_tc' (V3) needs scoring_func='sigmoid'")
            _check(per_group >= 2, 'model.n_group', m.n_group,
                   'noaux_tc scores a group by its top-2 experts: need >= 2 experts per group')
        _check(0 <= m.first_k_dense_replace <= m.num_hidden_layers, 'model.first_k_dense_replace',
               m.first_k_dense_replace, f'must be in [0, num_hidden_layers={m.num_hidden_layers}]')
        _check(m.n_shared_experts >= 0, 'model.n_shared_experts', m.n_shared_experts, 'must be >= 0')
        _check(m.capacity_factor >= 0, 'model.capacity_factor', m.capacity_factor, 'must be >= 0')
        _check(0 <= m.never_drop_fraction <= 1, 'model.never_drop_fraction', m.never_drop_fraction,
               'must be in [0, 1] (V2: 0.1)')
        for f in ('aux_loss_alpha', 'device_aux_alpha', 'comm_aux_alpha'):
            _check(m[f] >= 0, f'model.{f}', m[f], 'must be >= 0')
    _check(m.num_nextn_predict_layers >= 0, 'model.num_nextn_predict_layers',
           m.num_nextn_predict_layers, 'must be >= 0')
    if m.num_nextn_predict_layers:
        _check(m.n_routed_experts == 0 or m.first_k_dense_replace < m.num_hidden_layers,
               'model.num_nextn_predict_layers', m.num_nextn_predict_layers,
               'MTP blocks copy the MoE block, so at least one MoE layer is needed')


def parse_task_entries(entries, field: str) -> list[tuple[str, int]]:
    """('arithmetic:2', ...) -> [('arithmetic', 2), ...]; errors name the config `field` and what is valid."""
    parsed = []
    for entry in entries:
        task, _, level = str(entry).partition(':')
        if task not in TASK_LEVELS or not level.isdigit() or int(level) not in TASK_LEVELS[task]:
            valid = ', '.join(f'{t}:{"|".join(map(str, lv))}' for t, lv in TASK_LEVELS.items())
            fail(field, tuple(entries), f'each entry must be task:level, one of {valid}')
        parsed.append((task, int(level)))
    if not parsed:
        fail(field, tuple(entries), 'needs at least one task:level entry')
    return parsed


def validate_optim(o) -> None:
    """Raises ConfigError naming the first bad `optim.*` field, its value and what is valid."""
    _check(o.lr > 0, 'optim.lr', o.lr, 'the peak learning rate must be > 0')
    _choice(o.schedule, 'optim.schedule', SCHEDULES)
    _check(o.warmup_steps >= 0, 'optim.warmup_steps', o.warmup_steps, 'must be >= 0')
    _check(o.decay_steps > 0, 'optim.decay_steps', o.decay_steps,
           'must be > 0 (total steps of the schedule, usually train.steps)')
    _check(o.schedule != 'cosine' or o.decay_steps > o.warmup_steps, 'optim.decay_steps', o.decay_steps,
           f'a cosine schedule needs decay_steps > warmup_steps={o.warmup_steps} (both count from step 0)')
    _check(0 <= o.min_lr_ratio <= 1, 'optim.min_lr_ratio', o.min_lr_ratio,
           'the cosine floor as a fraction of lr must be in [0, 1]')
    for name in ('b1', 'b2'):
        _check(0 <= o[name] < 1, f'optim.{name}', o[name], 'Adam betas must be in [0, 1)')
    _check(o.eps > 0, 'optim.eps', o.eps, 'must be > 0')
    _check(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, 'must be >= 0')
    _choice(o.moment_dtype, 'optim.moment_dtype', MOMENT_DTYPES)
    _check(o.clip_norm >= 0, 'optim.clip_norm', o.clip_norm, 'must be >= 0 (0 turns clipping off)')
    milestones, factors = tuple(o.milestones), tuple(o.milestone_factors)
    _check(all(0 < m < 1 for m in milestones) and all(a < b for a, b in zip(milestones, milestones[1:])),
           'optim.milestones', milestones, 'must be strictly increasing fractions of decay_steps in (0, 1)')
    _check(o.schedule != 'multistep' or bool(milestones), 'optim.milestones', milestones,
           "schedule='multistep' needs at least one milestone, e.g. (0.8, 0.9)")
    _check(len(factors) == len(milestones), 'optim.milestone_factors', factors,
           f'needs one factor per milestone ({len(milestones)}: {milestones})')
    _check(all(0 < f <= 1 for f in factors), 'optim.milestone_factors', factors,
           'each lr multiplier must be in (0, 1]')
    ends, shapes, phase_factors = tuple(o.phase_ends), tuple(o.phase_shapes), tuple(o.phase_factors)
    _check(o.schedule != 'phases' or bool(ends), 'optim.phase_ends', ends,
           "schedule='phases' needs at least one phase end (tokens), e.g. (1e9,)")
    _check(all(_real(e) and e > 0 for e in ends) and all(a < b for a, b in zip(ends, ends[1:])), 'optim.phase_ends',
           ends, 'must be strictly increasing token counts > 0')
    _check(len(shapes) == len(ends) and all(x in PHASE_SHAPES for x in shapes), 'optim.phase_shapes', shapes,
           f'needs one of {PHASE_SHAPES} per phase ({len(ends)}: {ends})')
    _check(len(phase_factors) == len(ends) and all(_real(f) and 0 < f <= 1 for f in phase_factors),
           'optim.phase_factors', phase_factors, f'needs one lr multiplier in (0, 1] per phase ({len(ends)})')


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
    """Resolves -1 in the mesh config against the device count; errors name the axis."""
    sizes = {a: mesh_cfg[a] for a in MESH_AXES}
    for a, s in sizes.items():
        _check(isinstance(s, int) and (s > 0 or s == -1), f'mesh.{a}', s, 'must be a positive int or -1')
    fill = [a for a, s in sizes.items() if s == -1]
    _check(len(fill) <= 1, f'mesh.{fill[-1] if fill else "data"}', -1, 'at most one axis may be -1')
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        _check(num_devices % fixed == 0, f'mesh.{fill[0]}', -1,
               f'the other axes use {fixed} devices, which does not divide the {num_devices} devices')
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    _check(total == num_devices, 'mesh', dict(sizes), f'the axes multiply to {total}, need {num_devices} devices')
    return sizes


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks the sections every stage reads (model, data, optim, train, mesh) before anything compiles;
    raises ConfigError naming the field. A stage's own section is its module's `validate`'s
    (dsjax/stages.py runs both)."""
    defaults = base_config()
    _check_known(c, defaults)
    _check_types(c, defaults, '')
    _choice(c.stage, 'stage', STAGES)
    m = c.model
    validate_model(m)
    d = c.data
    _choice(d.source, 'data.source', SOURCES)
    if d.source == 'tasks':
        parse_task_entries(d.tasks, 'data.tasks')
        _positive_int(c, 'data.task_documents')
        _check(0 <= d.worked_fraction <= 1, 'data.worked_fraction', d.worked_fraction, 'must be in [0, 1]')
    elif d.source != 'stdlib':
        _check(len(d.paths) > 0, 'data.paths', d.paths, f'data.source={d.source!r} needs at least one path')
    if d.source == 'array_record':
        _check(bool(d.tokenizer_path), 'data.tokenizer_path', d.tokenizer_path,
               "data.source='array_record' needs the tokenizer the shards were written with (the dataset "
               'directory holds a copy: give the directory)')
    _check(all(isinstance(p, str) and p for p in d.paths), 'data.paths', d.paths,
           'every entry must be a non-empty file path or glob string')
    _choice(d.tokenizer, 'data.tokenizer', TOKENIZERS)
    _check(d.tokenizer != 'hf' or bool(d.tokenizer_path), 'data.tokenizer_path', d.tokenizer_path,
           "data.tokenizer='hf' needs a tokenizer.json file or a HF checkpoint directory holding one")
    _check(0 < d.val_fraction < 1, 'data.val_fraction', d.val_fraction, 'must be in (0, 1)')
    for f in ('seq_len', 'batch_size', 'max_doc_chars', 'shuffle_window'):
        _positive_int(c, f'data.{f}')
    _check(0 <= d.shuffle_seed < 2**32, 'data.shuffle_seed', d.shuffle_seed, 'must be in [0, 2**32)')
    _check(0 <= d.fim_rate <= 1, 'data.fim_rate', d.fim_rate, 'a share of the documents must be in [0, 1]')
    _check(d.vocab_size == m.vocab_size, 'data.vocab_size', d.vocab_size,
           f'must equal model.vocab_size={m.vocab_size}')
    _check(m.rope_scaling.type == 'yarn' or d.seq_len <= m.max_position_embeddings, 'data.seq_len',
           d.seq_len, f'exceeds model.max_position_embeddings={m.max_position_embeddings} '
           '(raise it, or extend the context with model.rope_scaling.type="yarn")')
    t = c.train
    for f in ('steps', 'log_every', 'eval_every', 'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
        _positive_int(c, f'train.{f}')
    _check(isinstance(t.micro_batches, int) and t.micro_batches > 0 and d.batch_size % t.micro_batches == 0,
           'train.micro_batches', t.micro_batches, f'must be a positive divisor of data.batch_size={d.batch_size}')
    if d.batch_ramp_start:
        micro = d.batch_size // t.micro_batches
        _check(0 < d.batch_ramp_start < d.batch_size and d.batch_ramp_start % micro == 0, 'data.batch_ramp_start',
               d.batch_ramp_start, f'must be a multiple of the micro-batch (data.batch_size / train.micro_batches = '
               f'{micro} rows) below data.batch_size={d.batch_size} (0: no ramp)')
        _check(d.batch_ramp_tokens > 0, 'data.batch_ramp_tokens', d.batch_ramp_tokens,
               'a ramp needs the tokens it lasts (> 0)')
    _choice(t.nonfinite_policy, 'train.nonfinite_policy', NONFINITE_POLICIES)
    _check(t.bias_update_rate >= 0, 'train.bias_update_rate', t.bias_update_rate, 'must be >= 0')
    for f in ('bias_update_until', 'mtp_weight_switch'):
        _check(0 <= t[f] <= 1, f'train.{f}', t[f], 'a fraction of train.steps must be in [0, 1]')
    _check(t.peak_flops >= 0, 'train.peak_flops', t.peak_flops, 'must be >= 0 (0 measures this machine)')
    _check(t.mtp_loss_weight >= 0, 'train.mtp_loss_weight', t.mtp_loss_weight, 'must be >= 0')
    _check(t.mtp_loss_weight == 0 or m.num_nextn_predict_layers > 0, 'train.mtp_loss_weight',
           t.mtp_loss_weight, 'needs model.num_nextn_predict_layers > 0')
    validate_optim(c.optim)
    if c.optim.schedule != 'constant' and c.optim.decay_steps < t.steps:
        logging.warning('config.optim.decay_steps=%d < train.steps=%d: the learning rate stays at its floor for the '
                        'last %d steps (leave decay_steps unset to follow train.steps)', c.optim.decay_steps, t.steps,
                        t.steps - c.optim.decay_steps)
    sizes = mesh_shape(c.mesh, num_devices)
    batch_axes = sizes['data'] * sizes['fsdp'] * sizes['expert']
    _check(d.batch_size % batch_axes == 0, 'data.batch_size', d.batch_size,
           f'must be divisible by the data-parallel size data x fsdp x expert = {batch_axes}')
    _check((d.batch_size // t.micro_batches) % batch_axes == 0, 'train.micro_batches', t.micro_batches,
           f'a micro-batch (data.batch_size / train.micro_batches) must split over the data-parallel size '
           f'data x fsdp x expert = {batch_axes}')
    heads = m.num_attention_heads
    _check(heads % sizes['tensor'] == 0, 'mesh.tensor', sizes['tensor'],
           f'must divide model.num_attention_heads={heads}')
    if m.attention_type == 'mha':
        kv = m.num_key_value_heads
        _check(kv % sizes['tensor'] == 0, 'mesh.tensor', sizes['tensor'],
               f'must divide model.num_key_value_heads={kv}')
    if m.n_routed_experts:
        _check(m.n_routed_experts % sizes['expert'] == 0, 'mesh.expert', sizes['expert'],
               f'must divide model.n_routed_experts={m.n_routed_experts}')
        # Group-limited routing is device- (V2) or node-limited (V3) only where a group is whole devices
        # or a device holds whole groups: expert e lives on device e // (E / mesh.expert).
        g, n = m.n_group, sizes['expert']
        if m.topk_method != 'greedy' and n > 1:
            _check(g % n == 0 or n % g == 0, 'model.n_group', g,
                   f'must be a multiple or a divisor of mesh.expert={n}, so that each expert group is whole devices '
                   f'(V2: n_group = mesh.expert, a token\'s experts on <= topk_group devices)')
    else:
        _check(sizes['expert'] == 1, 'mesh.expert', sizes['expert'], 'a dense model has no experts to shard')


def _defaults_from(section):
    """Class decorator: a frozen dataclass of the annotated fields, each defaulting to `section`'s value
    (base_config's), so every default is written once, in base_config."""

    def wrap(cls):
        for name in cls.__annotations__:
            value = section[name]
            setattr(cls, name, RopeScaling(**value.to_dict()) if name == 'rope_scaling' else value)
        return dataclasses.dataclass(frozen=True)(cls)

    return wrap


@_defaults_from(base_config().model.rope_scaling)
class RopeScaling:
    """HF `rope_scaling`: type 'yarn' (beta_*, mscale*) or 'llama3' (*_freq_factor); 'none' is plain RoPE."""
    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    low_freq_factor: float
    high_freq_factor: float


@_defaults_from(base_config().model)
class ModelConfig:
    """The frozen model section: what modules and jitted functions take instead of a ConfigDict."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_interleave: bool
    max_position_embeddings: int
    rope_scaling: RopeScaling
    attention_type: str
    qkv_bias: bool
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    scoring_func: str
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    aux_loss_alpha: float
    seq_aux: bool
    device_aux_alpha: float
    comm_aux_alpha: float
    moe_dispatch: str
    capacity_factor: float
    never_drop_fraction: float
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    initializer_range: float
    dtype: str
    param_dtype: str
    remat_policy: str
    attention_impl: str
    fp8: bool

    @property
    def attn_head_dim(self) -> int:
        """Per-head width of MHA/GQA attention."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace if self.n_routed_experts else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the decoupled key for MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention_type == 'mla' else self.attn_head_dim

    @property
    def yarn(self) -> bool:
        return self.rope_scaling.type == 'yarn'


def dtype_name(dtype, what: str = 'dtype') -> str:
    """'float32', 'bfloat16' or 'float16' for a dtype given by name, as a numpy dtype or as a jnp/np type
    (jnp.bfloat16, np.float32); `what` names the argument in the error."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f'{what}={dtype!r} is not a supported dtype: give one of {DTYPES}, by name or as '
                         'jnp.float32 / jnp.bfloat16 / np.float16')
    return name


def freeze_model(m) -> ModelConfig:
    """ConfigDict model section -> ModelConfig, validated."""
    validate_model(m)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(m.keys()) - fields)
    if unknown:
        fail(f'model.{unknown[0]}', m[unknown[0]], f'unknown field; valid fields: {sorted(fields)}')
    values = {k: m[k] for k in m.keys()}
    values['rope_scaling'] = RopeScaling(**m.rope_scaling.to_dict())
    return ModelConfig(**values)

