#!/bin/bash
# The GPU check: run ON a lent device machine after .ci/device/pack.sh prepared .device/ here
# (see pack.sh for the call), or here to try it (CHECK_SHAPE=small for a model llvmpipe runs in
# minutes). It answers in $OUT/check.log, and a phase's output longer than the 25 lines it copies
# there beside it in $OUT/PHASE.log:
#   adapter  which WebGPU adapter aha gets, its limits and features;
#   tests    the kernel and model tests on that adapter: on a hardware GPU they take the paths
#            meant for it (the tiled matmul, flash attention, f16) against their CPU twins and
#            golden fixtures, then the end-to-end ones (LoRA, frozen weights, the reference
#            process, the trainer);
#   bench    matmul and attention speed (`deno task bench matmul attention model`), and the same
#            products in PyTorch on the same device;
#   score    a Qwen2.5-0.5B-shaped random checkpoint scored by aha and by PyTorch (transformers'
#            Qwen2 when installed, else tests/fixtures/qwen2_torch.py), on CUDA when present;
#   grpo     a few timed GRPO steps of configs/qwen2.5-0.5b-gsm8k.yaml on that checkpoint;
#   lora     two of configs/qwen2.5-0.5b-gsm8k-lora.yaml (the base's weights kept in bf16);
#   torch_grpo  the full fine-tuning step in plain PyTorch on the same device, timed by phase.
# Each phase has a time cap and the whole check a budget (CHECK_SECONDS, default 420): a phase
# cut short says so, and the next one still runs. CHECK_ONLY="score grpo" runs only those phases.
set -uo pipefail
cd "$(dirname "$0")/../.."

# The test files that touch the GPU: kernels and the model first, end-to-end after.
KERNEL_TESTS=(matmul attention rmsnorm rope swiglu embedding elementwise sample split
  large_dispatch row_tails arena device model cpu_model kv_cache generate logprobs grpo_loss
  optimizer packed_rows shared_prompt loss_golden_cpu)
END_TO_END_TESTS=(lora frozen lora_memory checkpointing loss reference trainer train)

OUT=${OUT:-/tmp/aha-check}
mkdir -p "$OUT"
work=$(mktemp -d) # Deno, the npm cache, the checkpoint and the runs: gone when the check ends
trap 'rm -rf "$work"' EXIT
deadline=$((SECONDS + ${CHECK_SECONDS:-420}))
log="$OUT/check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

# phase NAME CAP COMMAND...: COMMAND's output to $OUT/NAME.log, for at most CAP seconds (fewer
# when the budget is nearly spent); its last 25 lines and how it ended go to check.log.
phase() {
  local name=$1 cap=$2
  shift 2
  if [ -n "${CHECK_ONLY:-}" ] && [[ " $CHECK_ONLY " != *" $name "* ]]; then return; fi
  local left=$((deadline - SECONDS))
  ((cap > left)) && cap=$left
  if ((cap < 10)); then
    say "== $name: skipped, the check's budget is spent"
    return
  fi
  say "== $name (at most ${cap} s)"
  local start=$SECONDS
  timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  grep -v '^\s*$' "$OUT/$name.log" | tail -n 25 | tee -a "$log"
  # A short output is all in check.log already (the device tool brings back eight files).
  (($(wc -l < "$OUT/$name.log") <= 25)) && rm "$OUT/$name.log"
  if ((status == 124 || status == 137)); then
    say "-- $name: cut at ${cap} s (the whole output is in $name.log)"
  else
    say "-- $name: exit $status after $((SECONDS - start)) s"
  fi
}

# The machine: NVIDIA's Vulkan and EGL drivers through the loaders pack.sh carried.
if [ -d /usr/local/nvidia ]; then
  for f in .device/gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$log"
fi
if [ -f .device/deno.xz ]; then
  xz -dc .device/deno.xz > "$work/deno" && chmod +x "$work/deno"
  export PATH="$work:$PATH"
fi
# The npm packages, offline: a Deno cache holding every package of deno.lock.
if [ -f .device/npm.tar.xz ]; then
  export DENO_DIR="$work/deno_dir"
  mkdir -p "$DENO_DIR" && tar -C "$DENO_DIR" -xJf .device/npm.tar.xz
fi
export XDG_RUNTIME_DIR="$work/xdg" NO_COLOR=1 DENO_NO_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
mkdir -m 700 -p "$XDG_RUNTIME_DIR"
# The Python with torch: the device machine's python3; here Debian's (/usr/bin/python3).
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch' 2>/dev/null && /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  PYTHON=/usr/bin/python3
fi
aha() { deno run -A main.ts "$@"; }
say "deno: $(deno --version | head -1); commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"

phase adapter 60 deno run -A main.ts gpu
phase tests 150 deno test -A $(printf 'tests/%s_test.ts ' "${KERNEL_TESTS[@]}")
phase tests_e2e 120 deno test -A $(printf 'tests/%s_test.ts ' "${END_TO_END_TESTS[@]}")
phase bench 60 deno run -A tests/bench.ts matmul attention model
phase torch_bench 45 "$PYTHON" .ci/device/torch_bench.py

# A Qwen2.5-0.5B-shaped random checkpoint (CHECK_SHAPE=small: 2 layers of 128, for llvmpipe).
model="$work/model"
if [ "${CHECK_SHAPE:-0.5b}" = small ]; then
  shape='"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2'
else
  shape='"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2'
fi
cat > "$work/config.json" <<JSON
{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", $shape,
 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": true,
 "max_position_embeddings": 32768, "torch_dtype": "float32", "bos_token_id": 151643,
 "eos_token_id": 151643}
JSON
aha init --config "$work/config.json" --out "$model" --seed 1 --force > "$work/init.log" 2>&1 ||
  say "init failed: $(tail -1 "$work/init.log")"
cp tests/fixtures/qwen2-tokenizer/{vocab.json,merges.txt,tokenizer_config.json,generation_config.json} "$model/"
"$PYTHON" -c "
import json, random
random.seed(1)
json.dump({'sequences': [[random.randrange(151936) for _ in range(n)] for n in (17, 64, 300)]},
          open('$work/sequences.json', 'w'))"
phase score 120 bash -c "
  start=\$SECONDS
  deno run -A main.ts score --model '$model' --input '$work/sequences.json' --output '$work/aha.json' &&
  echo \"aha score: \$((SECONDS - start)) s\" &&
  '$PYTHON' .ci/device/torch_score.py '$model' '$work/sequences.json' '$work/aha.json'"

# A random model earns the same -2 from format and correctness on every completion, which leaves
# nothing to train on; the length penalty of tests/fixtures/rewards/mine.ts tells completions apart.
# grpo_steps CONFIG STEPS OUTPUT: a short run of CONFIG on the checkpoint, then its steps' timings.
grpo_steps() {
  deno run -A main.ts train "$1" --set model="$model" \
    --set "reward_funcs=[format, correctness, $PWD/tests/fixtures/rewards/mine.ts#lengthPenalty]" \
    --set max_steps="$2" --set prompts_per_step=4 --set num_generations=8 \
    --set max_completion_length="${CHECK_COMPLETION:-128}" --set eval_prompts=1 \
    --set save_steps=0 --set sample_steps=0 --set output_dir="$3" &&
    "$PYTHON" -c "
import json, sys
keys = ('step', 'step_s', 'generate_s', 'reference_s', 'train_s', 'tokens_per_s', 'grad_norm')
for line in open(sys.argv[1]):
    row = json.loads(line)
    print({k: round(row[k], 3) if isinstance(row[k], float) else row[k] for k in keys if k in row})
" "$3/metrics.jsonl"
}
export -f grpo_steps
export model PYTHON
# Full fine-tuning, then LoRA over the base's weights kept in bf16 (the recipe's frozen_dtype).
phase grpo 150 bash -c "grpo_steps configs/qwen2.5-0.5b-gsm8k.yaml ${CHECK_STEPS:-3} $work/run"
phase lora 90 bash -c "grpo_steps configs/qwen2.5-0.5b-gsm8k-lora.yaml 2 $work/lora"
# The same step in plain PyTorch on the same device: prompts of 160 tokens, about a templated
# GSM8K question's.
phase torch_grpo 90 "$PYTHON" .ci/device/torch_grpo.py "$work/config.json" 4 8 160 \
  "${CHECK_COMPLETION:-128}" 4
say "== done in $SECONDS s"
