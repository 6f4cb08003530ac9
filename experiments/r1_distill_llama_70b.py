"""DeepSeek-R1-Distill-Llama-70B at true size, 70.6B parameters (70,553,706,496):
R1's distillation (paper 2.4: SFT only) of Llama-3.3-70B-Instruct.

Llama-3.3: 80 layers, d 8192, 64 heads / 8 kv heads, FFN 28672, vocab 128,256, llama3 RoPE scaling as the 8B.
The architecture is the released config.json's (dsjax.interop.hf loads and saves the checkpoint).

Run:      python -m dsjax.main --config=experiments/r1_distill_llama_70b.py --workdir=DIR \\
            --config.sft.source=jsonl --config.sft.paths='("samples.jsonl",)'
          from meta-llama/Llama-3.3-70B-Instruct (init.checkpoint: a Hub id or a directory) in the tokenizer and chat
          template of deepseek-ai/DeepSeek-R1-Distill-Llama-70B (data.tokenizer_path). R1's ~800K samples were never
          released: bring your own.
Hardware: laid out for 256 chips (data=1, fsdp=-1, tensor=8). `python -m dsjax.aot
          --config=experiments/r1_distill_llama_70b.py --topology=v5p-512` (batch 32 x 32,768, remat full, splash
          attention): fits, 56.19 of 95.7 GiB per device (3.10 GiB parameters and optimizer state, 53.09 GiB
          temporaries), compiled in 39 s on a busy 2-core host; 336 tokens/s per chip projected at 40% MFU.
Expect:   not run at this size.
Variants: `:smoke` a tiny student of the same shape family on the built-in cold-start set (tests).
"""
from dsjax import presets


def get_config(arg=None):
    return presets.r1_distill_sft('r1_distill_llama_70b', base='meta-llama/Llama-3.3-70B-Instruct',
                                  tokenizer='deepseek-ai/DeepSeek-R1-Distill-Llama-70B', batch=32,
                                  mesh=dict(data=1, fsdp=-1, tensor=8), arg=arg)
