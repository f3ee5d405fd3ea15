#!/usr/bin/env python3
"""How much bf16 arithmetic alone moves a model's logits: Hugging Face transformers in float32
and in bfloat16 on the same weights and prompts, relative L2 of the last-position logits and
top-1 agreement. Gives the scale against which `gpu_bench check` (CUDA bf16 vs CPU f32) is read
for random-weight models. Run on the device machine:

    python3 scripts/device/torch_precision.py --model DIR [--prompts 7,70] [--seed 7]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default="7,70")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).cuda().eval()
        vocab = model.config.vocab_size
        g.manual_seed(args.seed)
        outs = []
        with torch.inference_mode():
            for n in [int(x) for x in args.prompts.split(",")]:
                ids = torch.randint(0, vocab, (1, n), generator=g).cuda()
                outs.append(model(ids, logits_to_keep=1).logits[0, -1].float().cpu())
        logits[dtype] = outs
        del model
        torch.cuda.empty_cache()
    for n, ref, low in zip(args.prompts.split(","), logits[torch.float32], logits[torch.bfloat16]):
        rel = (low - ref).norm() / ref.norm()
        print(f"prompt {n:>5} tokens: bf16 vs f32 relative L2 {rel:.3e}, "
              f"top-1 {'same' if low.argmax() == ref.argmax() else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
