"""DeepSeek-R1-Distill-Qwen-14B at true size, 14.8B parameters (14,770,033,664):
R1's distillation (paper 2.4: SFT only) of Qwen2.5-14B.

Qwen2 with q/k/v biases: 48 layers, d 5120, 40 heads / 8 kv heads, FFN 13824, vocab 152,064, RoPE theta 1e6.
The architecture is the released config.json's (dsjax.interop.hf loads and saves the checkpoint).

Run:      python -m dsjax.main --config=experiments/r1_distill_qwen_14b.py --workdir=DIR \\
            --config.sft.source=jsonl --config.sft.paths='("samples.jsonl",)'
          from Qwen/Qwen2.5-14B (init.checkpoint: a Hub id or a directory) in the tokenizer and chat
          template of deepseek-ai/DeepSeek-R1-Distill-Qwen-14B (data.tokenizer_path). R1's ~800K samples were never
          released: bring your own.
Hardware: laid out for 64 chips (data=1, fsdp=-1, tensor=2). `python -m dsjax.aot
          --config=experiments/r1_distill_qwen_14b.py --topology=v5p-128` (batch 32 x 32,768, remat full, splash
          attention): fits, 30.16 of 95.7 GiB per device (2.59 GiB parameters and optimizer state, 27.58 GiB
          temporaries), compiled in 177 s on a busy 2-core host; 1,388 tokens/s per chip projected at 40% MFU.
Expect:   not run at this size.
Variants: `:smoke` a tiny student of the same shape family on the built-in cold-start set (tests).
"""
from dsjax import presets


def get_config(arg=None):
    return presets.r1_distill_sft('r1_distill_qwen_14b', base='Qwen/Qwen2.5-14B',
                                  tokenizer='deepseek-ai/DeepSeek-R1-Distill-Qwen-14B', batch=32,
                                  mesh=dict(data=1, fsdp=-1, tensor=2), arg=arg)
