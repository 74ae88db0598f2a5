#!/usr/bin/env bash
# The training issue's GPU check, for a machine with one CUDA GPU (under 10 minutes):
#   scripts/gpu_check.sh > docs/gpu.md
# 1. the smoke Stage I on CUDA in bf16 with QLoRA (step time, peak memory);
# 2. one Stage I forward + backward of Idefics2-8b's full-width architecture (random weights,
#    4-bit) with 2 and 4 LLM layers at per-device batch 2, extrapolated to all 32 layers;
# 3. the same for Qwen2.5-VL-7B's architecture on 448x448 images, extrapolated to its 28 layers.
# Arguments go to scripts/gpu_check.py (`--only qwen2.5-vl`: 1 and 3 only).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
echo '```'
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 580 "$(command -v python || command -v python3)" scripts/gpu_check.py "$@"
echo '```'
