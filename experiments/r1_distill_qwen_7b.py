"""DeepSeek-R1-Distill-Qwen-7B at true size, 7.62B parameters (7,615,616,512):
R1's distillation (paper 2.4: SFT only) of Qwen2.5-Math-7B.

Qwen2 with q/k/v biases: 28 layers, d 3584, 28 heads / 4 kv heads, FFN 18944, vocab 152,064.
The architecture is the released config.json's (dsjax.interop.hf loads and saves the checkpoint).

Run:      python -m dsjax.main --config=experiments/r1_distill_qwen_7b.py --workdir=DIR \\
            --config.sft.source=jsonl --config.sft.paths='("samples.jsonl",)'
          from Qwen/Qwen2.5-Math-7B (init.checkpoint: a Hub id or a directory) in the tokenizer and chat
          template of deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (data.tokenizer_path). R1's ~800K samples were never
          released: bring your own.
Hardware: laid out for 32 chips (data=1, fsdp=-1). `python -m dsjax.aot --config=experiments/r1_distill_qwen_7b.py
          --topology=v5p-64` (batch 32 x 32,768, remat full, splash attention): fits, 26.40 of 95.7 GiB per device (2.66
          GiB parameters and optimizer state, 23.74 GiB temporaries), compiled in 228 s on a busy 2-core host; 2,954
          tokens/s per chip projected at 40% MFU.
Expect:   not run at this size.
Variants: `:smoke` a tiny student of the same shape family on the built-in cold-start set (tests).
"""
from dsjax import presets


def get_config(arg=None):
    return presets.r1_distill_sft('r1_distill_qwen_7b', base='Qwen/Qwen2.5-Math-7B',
                                  tokenizer='deepseek-ai/DeepSeek-R1-Distill-Qwen-7B', batch=32,
                                  mesh=dict(data=1, fsdp=-1), arg=arg)
