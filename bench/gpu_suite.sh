#!/usr/bin/env bash
# chatft's GPU tests and benchmarks on a 4-GPU machine, several jobs at once (one "lane" per
# GPU or GPU group), each with its own time limit so one failure never loses the others.
#
#   bench/gpu_suite.sh one_gpu     # GPU tests; 1-GPU speed rows: chatft (3 epochs + export),
#                                  # the tutorial recipe, kernel ablations; the 24 GiB mode
#   bench/gpu_suite.sh four_gpu    # 4-GPU rows: chatft ZeRO-2 3 epochs + export, the tutorial
#                                  # recipe, the tutorial job on ZeRO-3 for one epoch
#   bench/gpu_suite.sh extras      # SmolLM2 quality, ZeRO-2 + CPU offload epoch on 1 GPU,
#                                  # Qwen-1 7B folder, serving a 7B export
#
# and, one after another on a one-GPU machine:
#   bench/gpu_suite.sh speed_1gpu   # chatft's recommended 1-GPU setting: 3 epochs + export,
#                                   # a 6-step row, and Liger off
#   bench/gpu_suite.sh quality      # SmolLM2 quality, the three variants trained at once
#   bench/gpu_suite.sh compile_1gpu # the torch.compile ablation
#
# Environment: CHATFT_SHARED (folder with data/huanhuan.json and assets/qwen.tiktoken),
# WHEELS (optional folder of wheels to install offline: deepspeed, liger-kernel, gguf, ...),
# SMOLLM2_GGUF (the SmolLM2 GGUF for `extras`), OUT (where logs.tar.gz goes; default /tmp).
# Result files land in bench/results/ (and inside the tarball).
set -u
PHASE=${1:?phase: one_gpu | four_gpu | extras | speed_1gpu | quality | compile_1gpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
W=${CHATFT_GPU_WORK:-/tmp/chatft-gpu}
LOGS=$W/logs/$PHASE
RES=$ROOT/bench/results
mkdir -p "$LOGS" "$RES" "$W/models"
START=$(date +%s)

if [ -n "${WHEELS:-}" ] && [ ! -d /tmp/site/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl > "$LOGS/pip.log" 2>&1
fi
export PYTHONPATH=/tmp/site:$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=$W/torch_extensions
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
DATA=$CHATFT_SHARED/data/huanhuan.json
SYSTEM="现在你要扮演皇帝身边的女人--甄嬛."
Q7=$W/models/qwen2-7b-config   # config.json + tokenizer only: random_init builds the weights

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOGS/suite.log"; }
lane() {  # lane NAME GPUS TIMEOUT CMD...: run CMD on those GPUs, logged, time-limited
  local name=$1 gpus=$2 limit=$3; shift 3
  log "start $name (GPUs $gpus, limit ${limit}s)"
  CUDA_VISIBLE_DEVICES=$gpus timeout --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  log "end $name: exit $?"
}
gpu_peaks() {  # sample nvidia-smi every 5 s into the phase's logs (stopped by finish)
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv -l 5 > "$LOGS/nvidia-smi.csv" 2>&1 &
  SAMPLER=$!
}
model_folder() {
  [ -f "$Q7/tokenizer.json" ] || python3 -c "
import sys; from pathlib import Path
from bench.lib.shapes import MODEL_CONFIGS, write_model_folder
write_model_folder(Path('$Q7'), MODEL_CONFIGS['qwen2-7b'], Path('$CHATFT_SHARED/assets/qwen.tiktoken'))"
}
train7b() {  # train7b OUTNAME ARGS...: the tutorial job on the random Qwen2-7B shape
  local name=$1; shift
  python3 -m chatft train --model "$Q7" --random_init true --data "$DATA" --system "$SYSTEM" \
    --output_dir "$W/runs/$name" --logging_steps 1 "$@"
}
export -f train7b
export W Q7 DATA SYSTEM
finish() {
  kill "$SAMPLER" 2>/dev/null
  wait
  for d in "$W"/runs/*/; do
    [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$LOGS/metrics_$(basename "$d").jsonl"
    [ -f "$d/final/chatft_export_check.json" ] && cp "$d/final/chatft_export_check.json" "$LOGS/export_check_$(basename "$d").json"
  done
  cp "$RES"/*.json "$LOGS/" 2>/dev/null
  tar -czf "${OUT:-/tmp}/$PHASE.tar.gz" -C "$W/logs" "$PHASE"
  log "done; $(ls "$LOGS" | wc -l) files in $PHASE.tar.gz"
}

nvidia-smi -L > "$LOGS/gpus.txt" 2>&1
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" > "$LOGS/versions.txt" 2>&1
model_folder > "$LOGS/model_folder.log" 2>&1
gpu_peaks

case $PHASE in
one_gpu)
  ( lane gpu_tests 0,1 230 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider
    lane ablations_a 0 280 python3 bench/train_speed.py --gpus 1 --variants attn_varlen,liger_off \
      --steps 6 --timeout 135 --label h200x1_ablations_a --workdir "$W/ts_abl_a" &
    lane ablations_b 1 280 python3 bench/train_speed.py --gpus 1 --variants gc_flip,attn_flex \
      --steps 6 --timeout 135 --label h200x1_ablations_b --workdir "$W/ts_abl_b"
    wait ) &
  lane chatft_e2e_1gpu 2 400 python3 bench/train_speed.py --gpus 1 --variants chatft_e2e \
    --timeout 390 --label h200x1_chatft --workdir "$W/ts_1gpu" &
  # The tutorial recipe is bound by its CPU optimizer: nothing else CPU-heavy runs beside it.
  ( lane tutorial_1gpu 3 320 python3 bench/train_speed.py --gpus 1 --variants tutorial --steps 6 \
      --timeout 310 --force --label h200x1_tutorial --workdir "$W/ts_tut1"
    lane budget_24gib 3 200 bash -c 'train7b budget24 --max_steps 3 --per_device_train_batch_size 16 \
      --zero_stage 3 --offload_optimizer cpu --offload_param cpu --gradient_checkpointing on \
      --max_gpu_memory 24GiB --precision bf16 --export false' ) &
  finish ;;
four_gpu)
  lane chatft_e2e_4gpu 0,1,2,3 200 python3 bench/train_speed.py --gpus 4 --variants chatft_e2e \
    --timeout 190 --label h200x4_chatft --workdir "$W/ts_4gpu" --keep-export
  lane zero3_epoch 0,1,2,3 130 bash -c 'train7b zero3_epoch --nproc 4 --zero_stage 3 \
    --per_device_train_batch_size 32 --num_train_epochs 1 --precision bf16'
  lane tutorial_4gpu 0,1,2,3 165 python3 bench/train_speed.py --gpus 4 --variants tutorial --steps 3 \
    --timeout 155 --force --label h200x4_tutorial --workdir "$W/ts_tut4"
  finish ;;
extras)
  lane quality 0 430 python3 bench/quality_smollm2.py --model-path "${SMOLLM2_GGUF}" \
    --variants recommended,tutorial_hp --label h200x1 &
  lane offload_epoch 1 430 bash -c 'train7b zero2_offload_epoch --zero_stage 2 --offload_optimizer cpu \
    --per_device_train_batch_size 128 --micro_batch_tokens 8192 --num_train_epochs 1 --precision bf16' &
  lane qwen1_7b 2 430 python3 bench/qwen1_7b.py --label h200x1 --workdir "$W/qwen1" --timeout 200 &
  ( lane gpu_tests 3 120 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider
    lane serve_7b 3 170 python3 bench/serve_speed.py --device cuda --label h200x1_qwen2-7b \
      "$(ls -d "$W"/ts_4gpu/*/run/final 2>/dev/null | head -1)"
    lane varlen_1gpu 3 130 python3 bench/train_speed.py --gpus 1 --variants chatft,attn_varlen --steps 5 \
      --timeout 60 --label h200x1_varlen --workdir "$W/ts_varlen" ) &
  finish ;;
speed_1gpu)
  lane chatft_e2e_1gpu 0 270 python3 bench/train_speed.py --gpus 1 --variants chatft_e2e \
    --timeout 260 --label h200x1_chatft_e2e --workdir "$W/ts_e2e"
  lane ablation_liger 0 250 python3 bench/train_speed.py --gpus 1 --variants chatft,liger_off \
    --steps 6 --timeout 110 --label h200x1_liger --workdir "$W/ts_liger"
  finish ;;
quality)
  # SmolLM2-135M leaves an H200 mostly idle: the variants train side by side.
  lane quality 0 540 python3 bench/quality_smollm2.py --model-path "${SMOLLM2_GGUF}" --parallel \
    --variants recommended,tutorial_hp,reference_hp --label h200x1 --runs-dir "$W/quality_runs"
  for v in recommended tutorial_hp reference_hp; do
    cp "$W/quality_runs/$v/bench_train.log" "$LOGS/quality_train_$v.log" 2>/dev/null
    cp "$W/quality_runs/$v/metrics.jsonl" "$LOGS/quality_metrics_$v.jsonl" 2>/dev/null
  done
  finish ;;
compile_1gpu)
  lane ablation_compile 0 300 python3 bench/train_speed.py --gpus 1 --variants compile_on --warmup-steps 3 \
    --steps 10 --timeout 290 --label h200x1_compile --workdir "$W/ts_compile"
  finish ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
