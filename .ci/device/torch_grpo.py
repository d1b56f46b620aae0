"""A GRPO step of the check's shape in plain PyTorch (.ci/device/check.sh): the side of its grpo
phase's timings. tests/fixtures/bench_torch.py's step (written from the model's definition, eager
PyTorch, float32 with TF32 off) on CUDA when present: P prompts × G completions of new_tokens
sampled with a KV cache, the reference's log-probs, forward and backward in micro-batches with
the clipped objective and the KL term, clipping and AdamW. Seconds per phase, the best of three.

Usage: torch_grpo.py CONFIG.json [P G PROMPT_LEN NEW_TOKENS MICRO]
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
import bench_torch  # noqa: E402

config = json.load(open(sys.argv[1]))
P, G, prompt_len, new_tokens, micro = (int(a) for a in (sys.argv[2:7] or [4, 8, 160, 128, 4]))
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
if hasattr(torch, "set_default_device"):
    torch.set_default_device(device)  # every tensor the step makes, on the GPU
seconds = bench_torch.grpo_step(None, P=P, G=G, prompt_len=prompt_len, new_tokens=new_tokens,
                                micro=micro, config=config, reps=3)
print(f"PyTorch GRPO step on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'}: "
      f"{P} prompts of {prompt_len} tokens × {G} completions of {new_tokens}, micro-batch {micro}")
print({name: round(s, 3) for name, s in seconds.items()})
