"""Scores sequences with PyTorch and compares them with aha's log-probs (.ci/device/check.sh).

Usage: torch_score.py MODEL_DIR SEQUENCES.json AHA.json
The model is transformers' Qwen2ForCausalLM when transformers is installed (the device machine
has it), else tests/fixtures/qwen2_torch.py, our own independent PyTorch Qwen2; on CUDA when
present, in float32 with TF32 off, log-softmax in float64.
"""

import json
import os
import sys
import time

import torch

model_dir, sequences_path, aha_path = sys.argv[1:4]
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
sequences = json.load(open(sequences_path))["sequences"]

start = time.time()
try:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = model.to(device).eval()
    name = "transformers"

    def logits_of(ids):
        return model(torch.tensor([ids], device=device)).logits[0]
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    import qwen2_torch as q

    config, weights = q.load_hf_dir(model_dir)
    weights = {k: v.to(device=device, dtype=torch.float32) for k, v in weights.items()}
    name = "qwen2_torch"

    def logits_of(ids):
        return q.forward_logits(config, weights, torch.tensor([ids], device=device))[0]

torch_logprobs = []
with torch.no_grad():
    for ids in sequences:
        logp = torch.log_softmax(logits_of(ids)[:-1].double(), -1)
        target = torch.tensor(ids[1:], device=device)[:, None]
        torch_logprobs.append(logp.gather(-1, target)[:, 0].tolist())
seconds = time.time() - start

aha_logprobs = json.load(open(aha_path))["logprobs"]
worst = max(
    abs(a - t) for aha_row, torch_row in zip(aha_logprobs, torch_logprobs)
    for a, t in zip(aha_row, torch_row)
)
lengths = [len(r) for r in aha_logprobs] == [len(r) for r in torch_logprobs]
verdict = "OK" if worst <= 1e-3 and lengths else "FAR"
print(f"PyTorch ({name}, {device}) scored {len(sequences)} sequences in {seconds:.1f} s")
print(f"max |aha - PyTorch| log-prob: {worst:.3g} ({verdict}, tolerance 1e-3)")
