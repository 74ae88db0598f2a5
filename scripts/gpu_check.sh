#!/usr/bin/env bash
# The training issue's GPU check, for a machine with one CUDA GPU (under 8 minutes):
#   scripts/gpu_check.sh > docs/gpu.md
# 1. the smoke Stage I on CUDA in bf16 with QLoRA (step time, peak memory);
# 2. one Stage I forward + backward of Idefics2-8b's full-width architecture (random weights,
#    4-bit) with 2 and 4 LLM layers at per-device batch 2, extrapolated to all 32 layers.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
echo '```'
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 480 "$(command -v python || command -v python3)" scripts/gpu_check.py
echo '```'
