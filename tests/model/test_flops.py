"""The FLOP model against hand counts: every matmul weight a token passes through, attention, MTP, head."""
from dsjax.model import flops


def test_dense_mha_hand_count(tiny_model):
    cfg = tiny_model()  # d=32, 4 heads of 8, SwiGLU 64, 3 layers, vocab 97
    attn = 32 * 4 * 8 * 3 + 4 * 8 * 32  # q, k, v; o
    ffn = 3 * 32 * 64
    assert flops.activated_matmul_params(cfg) == 3 * (attn + ffn) + 32 * 97
    # Causal scores and weighted values: 2 FLOPs x heads x (K + V) x (L + 1) / 2 keys on average.
    assert flops.attention_flops_per_token(cfg, 16) == 3 * 2 * 4 * (8 + 8) * 17 / 2


def test_mla_moe_mtp_hand_count(tiny_model):
    # d=32, 4 heads, q rank 24, kv rank 16, nope/rope/v 8; 1 dense + 2 MoE layers of 8 experts (top-2,
    # width 16, 1 shared); one MTP depth.
    cfg = tiny_model(mla_moe=True, num_nextn_predict_layers=1)
    q = 32 * 24 + 24 * 4 * (8 + 8)
    kv = 32 * (16 + 8) + 16 * 4 * (8 + 8)
    attn = q + kv + 4 * 8 * 32
    dense_ffn = 3 * 32 * 64
    moe_ffn = 32 * 8 + 3 * 32 * 16 * (2 + 1)  # router, top-2 routed + 1 shared, not the other 6
    head = 32 * 97
    mtp = 2 * 32 * 32 + attn + moe_ffn + head  # eh_proj, a MoE block, the shared head
    main = (attn + dense_ffn) + 2 * (attn + moe_ffn) + head
    assert flops.activated_matmul_params(cfg, include_mtp=False) == main
    assert flops.activated_matmul_params(cfg) == main + mtp
    attention = 4 * 2 * 4 * (16 + 8) * 17 / 2  # 3 layers + the MTP block; qk 16 wide, v 8
    assert flops.attention_flops_per_token(cfg, 16) == attention
    assert flops.train_flops_per_token(cfg, 16) == 3 * (2 * (main + mtp) + attention)
