#!/usr/bin/env bash
# chatft beside LLaMA-Factory and ms-swift on one GPU (bench/peers.py), in phases that each
# end well inside 9 minutes and never lose earlier rows (the result file is rewritten after
# every row; a second phase with the same label adds its rows to it).
#
#   bench/peers_suite.sh speed        # 7B shape: lf_neat, lf_neat_zero2, swift_packing
#   bench/peers_suite.sh speed_more   # 7B shape: lf_packing, swift_nopack (ROWS=... overrides)
#   bench/peers_suite.sh quality      # Qwen2.5-Coder-0.5B: LLaMA-Factory and ms-swift side by
#                                     # side (ROWS=swift_fp32 PEERS_CHATFT=1: a second call with
#                                     # ms-swift on fp32 weights and chatft's own row)
#
# Environment:
#   CHATFT_SHARED  folder with data/huanhuan.json and assets/qwen.tiktoken (required)
#   LF_WHEELS      LLaMA-Factory's wheels (default .carry/peer-lf; bench/peers_wheels.sh)
#   SWIFT_WHEELS   ms-swift's wheels (default .carry/peer-swift)
#   QWEN_GGUF      quality: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (size and sha256 checked)
#   PEERS_CHATFT=1 add chatft's own row (speed: its recommended 1-GPU setting; quality:
#                  chatft train at the same settings); needs DeepSpeed and Liger for chatft,
#                  installed into /tmp/site from LF_WHEELS
#   ROWS           comma-separated rows instead of the phase's set (bench/lib/peer_runs.py)
#   LABEL          result files peers_<LABEL>.json / peers_quality_<LABEL>.json (default h200x1)
#   LIMIT, ROW_TIMEOUT  quality: seconds for the whole phase (530) and for each tool's training (360)
#   OUT            where peers_<phase>.tar.gz (logs, configs, recorder files) and the result
#                  files are copied (default /tmp)
set -u
PHASE=${1:?phase: speed | speed_more | quality}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
W=${PEERS_WORK:-/tmp/chatft-peers}
LOGS=$W/logs/$PHASE
LF_WHEELS=${LF_WHEELS:-$ROOT/.carry/peer-lf}
SWIFT_WHEELS=${SWIFT_WHEELS:-$ROOT/.carry/peer-swift}
LABEL=${LABEL:-h200x1}
OUTDIR=${OUT:-/tmp}
mkdir -p "$LOGS"
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOGS/suite.log"; }

install() {  # install NAME WHEELS TARGET: the tool's own folder, once per machine
  local name=$1 wheels=$2 target=$3
  if [ ! -f "$target/.installed" ]; then
    rm -rf "$target"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$target" "$wheels"/*.whl > "$LOGS/pip_$name.log" 2>&1 \
      && touch "$target/.installed"
    log "installed $name into $target: exit $?"
  fi
}
install llamafactory "$LF_WHEELS" /tmp/peer-lf
install swift "$SWIFT_WHEELS" /tmp/peer-swift
if [ ! -d /tmp/site/gguf ] && ls "$LF_WHEELS"/chatft-extras/*.whl > /dev/null 2>&1; then
  # The driver dequantizes the quality model's GGUF (transformers needs the gguf package).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$LF_WHEELS"/chatft-extras/*.whl > "$LOGS/pip_gguf.log" 2>&1
  log "installed gguf into /tmp/site: exit $?"
fi
CHATFT_FLAG=()
if [ "${PEERS_CHATFT:-0}" = 1 ]; then
  CHATFT_FLAG=(--chatft)
  if [ ! -d /tmp/site/deepspeed ]; then  # chatft's own extras, from the same wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$LF_WHEELS"/{deepspeed,hjson,pydantic,pydantic_core,annotated_types,typing_inspection,typing_extensions,liger_kernel}-*.whl \
      > "$LOGS/pip_chatft.log" 2>&1
    log "installed chatft's extras into /tmp/site: exit $?"
  fi
fi
# The driver runs chatft's stack; each tool's process gets only its own folder (bench/lib/peer_runs.py).
export PYTHONPATH=/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi -L > "$LOGS/gpus.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" \
  > "$LOGS/versions.txt" 2>&1
nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv -l 5 > "$LOGS/nvidia-smi.csv" 2>&1 &
SAMPLER=$!

run() {  # run LIMIT ARGS...: bench/peers.py with an overall time limit
  local limit=$1; shift
  log "start: peers.py $*"
  timeout --kill-after=20 "$limit" python3 bench/peers.py "$@" --work "$W" --label "$LABEL" \
    > "$LOGS/peers.log" 2>&1
  log "end: exit $?"
}

case $PHASE in
speed)
  run 500 speed --rows "${ROWS:-lf_neat,lf_neat_zero2,swift_packing}" "${CHATFT_FLAG[@]}" \
    --steps 8 --warmup 2 --timeout 150 ;;
speed_more)
  run 500 speed --rows "${ROWS:-lf_packing,swift_nopack}" "${CHATFT_FLAG[@]}" \
    --steps 8 --warmup 2 --timeout 170 ;;
quality)
  run "${LIMIT:-530}" quality --gguf "${QWEN_GGUF:?QWEN_GGUF: the Qwen2.5-Coder-0.5B GGUF}" \
    --rows "${ROWS:-llamafactory,swift}" "${CHATFT_FLAG[@]}" --timeout "${ROW_TIMEOUT:-360}" ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac

kill "$SAMPLER" 2>/dev/null
cp bench/results/peers_*.json "$LOGS/" 2>/dev/null
# Logs, configs and recorder files; never weights.
tar -czf "$OUTDIR/peers_$PHASE.tar.gz" -C "$W" --exclude='*.safetensors' --exclude='*.bin' \
  --exclude='*.pt' --exclude='*.pth' --exclude='models' --exclude='hf_home' --exclude='ms_cache' \
  --exclude='answer_model' --exclude='data' --exclude='data_all' --exclude='quality_data' \
  "logs/$PHASE" $(cd "$W" && ls -d speed quality 2>/dev/null)
cp bench/results/peers_*.json "$OUTDIR/" 2>/dev/null
log "done: $OUTDIR/peers_$PHASE.tar.gz"
