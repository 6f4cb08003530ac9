"""DeepSeek-R1-Distill-Qwen-1.5B at true size, 1.78B parameters (1,777,088,000):
R1's distillation (paper 2.4: SFT only) of Qwen2.5-Math-1.5B.

Qwen2 with q/k/v biases: 28 layers, d 1536, 12 heads / 2 kv heads, FFN 8960, vocab 151,936. The base ties
its head to the embedding, the student does not: the head starts as the embedding.
The architecture is the released config.json's (dsjax.interop.hf loads and saves the checkpoint).

Run:      python -m dsjax.main --config=experiments/r1_distill_qwen_1_5b.py --workdir=DIR \\
            --config.sft.source=jsonl --config.sft.paths='("samples.jsonl",)'
          from Qwen/Qwen2.5-Math-1.5B (init.checkpoint: a Hub id or a directory) in the tokenizer and chat
          template of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (data.tokenizer_path). R1's ~800K samples were never
          released: bring your own.
Hardware: laid out for 16 chips (data=1, fsdp=-1). `python -m dsjax.aot --config=experiments/r1_distill_qwen_1_5b.py
          --topology=v5p-32` (16 chips; batch 32 x 32,768, remat full, splash attention): fits, 20.9 of 95.7 GiB per
          device (1.24 GiB parameters and optimizer state, 19.6 GiB temporaries), compiled in 220 s on a busy 2-core
          host; 10.4K tokens/s per chip projected at 40% MFU.
Expect:   not run at this size.
Variants: `:smoke` a tiny student of the same shape family on the built-in cold-start set (tests).
"""
from dsjax import presets


def get_config(arg=None):
    return presets.r1_distill_sft('r1_distill_qwen_1_5b', base='Qwen/Qwen2.5-Math-1.5B',
                                  tokenizer='deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B', batch=32,
                                  mesh=dict(data=1, fsdp=-1), arg=arg)
