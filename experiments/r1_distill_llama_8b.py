"""DeepSeek-R1-Distill-Llama-8B at true size, 8.03B parameters (8,030,261,248):
R1's distillation (paper 2.4: SFT only) of Llama-3.1-8B.

Llama-3.1: 32 layers, d 4096, 32 heads / 8 kv heads, FFN 14336, vocab 128,256, RoPE theta 5e5 with llama3
scaling (factor 8 over 8,192 positions, low / high frequency factors 1 and 4).
The architecture is the released config.json's (dsjax.interop.hf loads and saves the checkpoint).

Run:      python -m dsjax.main --config=experiments/r1_distill_llama_8b.py --workdir=DIR \\
            --config.sft.source=jsonl --config.sft.paths='("samples.jsonl",)'
          from meta-llama/Llama-3.1-8B (init.checkpoint: a Hub id or a directory) in the tokenizer and chat
          template of deepseek-ai/DeepSeek-R1-Distill-Llama-8B (data.tokenizer_path). R1's ~800K samples were never
          released: bring your own.
Hardware: laid out for 32 chips (data=1, fsdp=-1). `python -m dsjax.aot --config=experiments/r1_distill_llama_8b.py
          --topology=v5p-64` (batch 32 x 32,768, remat full, splash attention): fits, 26.95 of 95.7 GiB per device (2.81
          GiB parameters and optimizer state, 24.14 GiB temporaries), compiled in 150 s on a busy 2-core host; 2,593
          tokens/s per chip projected at 40% MFU.
Expect:   not run at this size.
Variants: `:smoke` a tiny student of the same shape family on the built-in cold-start set (tests).
"""
from dsjax import presets


def get_config(arg=None):
    return presets.r1_distill_sft('r1_distill_llama_8b', base='meta-llama/Llama-3.1-8B',
                                  tokenizer='deepseek-ai/DeepSeek-R1-Distill-Llama-8B', batch=32,
                                  mesh=dict(data=1, fsdp=-1), arg=arg)
