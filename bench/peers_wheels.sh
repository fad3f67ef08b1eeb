#!/usr/bin/env bash
# Offline wheel bundles of LLaMA-Factory and ms-swift for the GPU machine (Python 3.12,
# x86_64, torch 2.11 + CUDA 13.0, transformers 5.17, no network, no DeepSpeed): the exact
# versions below, downloaded from PyPI. Each tool is installed on that machine into its own
# folder, never mixed with chatft's packages:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-lf .carry/peer-lf/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-swift .carry/peer-swift/*.whl
#
# and each tool's runs get only its folder on PYTHONPATH (bench/lib/peer_runs.py).
#
#   bench/peers_wheels.sh                 # .carry/peer-lf and .carry/peer-swift for Python 3.12
#   PY=3.11 DEST=/tmp/peers311 bench/peers_wheels.sh   # the same set for this machine's 3.11
#
# The sets are the smallest that run each tool's training CLI (llamafactory-cli train,
# swift sft; no web UI, API server, video or audio). Pinned by the tools and taken at the
# newest release allowed: LLaMA-Factory 0.9.5 pins transformers<=5.6.0 (which in turn needs
# tokenizers<=0.23.0, so 0.22.2: the machine's 0.23.2 would fail transformers' import check),
# accelerate<=1.11.0, datasets<=4.0.0 (fsspec<=2025.3.0, dill<0.3.9, multiprocess<0.70.17),
# peft<=0.18.1, trl<=0.24.0 (its other pins, tyro and fire, serve only its v1 launcher and
# scripts: `llamafactory-cli train` never imports them). ms-swift 4.6.0 accepts transformers<5.20, so it uses
# the machine's 5.17 (and its tokenizers, accelerate, huggingface_hub); it pins datasets<4.8.5,
# peft<0.21, trl<1.0. modelscope is 1.36.0, the newest release without the modelscope-hub
# package (whose import needs `cryptography`, which the machine lacks). What the machine
# already has (numpy, pandas, pyarrow, safetensors, huggingface_hub, sentencepiece, tiktoken,
# psutil, pyyaml, rich, einops, triton, torchaudio, ...) is not carried.
# DeepSpeed 0.19.8 is carried in LLaMA-Factory's set (its ZeRO-2 row) as a pure-Python wheel
# (DS_BUILD_OPS=0; PyPI has only its sdist): copied from $DEVICE_WHEELS when that folder has
# it, else built here.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-3.12}
DEST=${DEST:-$ROOT/.carry}
DEVICE_WHEELS=${DEVICE_WHEELS:-$ROOT/../shared/device-wheels}
ABI=cp${PY/./}

COMMON=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 liger-kernel==0.8.5
)
LF=(
  llamafactory==0.9.5 transformers==5.6.0 tokenizers==0.22.2 accelerate==1.11.0
  datasets==4.0.0 fsspec==2025.3.0 dill==0.3.8 multiprocess==0.70.16 peft==0.18.1 trl==0.24.0
  omegaconf==2.4.0 hjson==3.1.0
)
SWIFT=(
  ms-swift==4.6.0 modelscope==1.36.0 datasets==4.8.4 fsspec==2026.2.0 dill==0.4.1
  multiprocess==0.70.19 peft==0.20.0 trl==0.29.1 binpacking==2.0.1 json-repair==0.64.6
)

fetch() {  # fetch DIR SPEC...: wheels only, no dependencies, for Python $PY on manylinux x86_64
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}

deepspeed_wheel() {  # deepspeed_wheel DIR
  local dir=$1 have
  have=$(ls "$DEVICE_WHEELS"/deepspeed-0.19.8-py3-none-any.whl 2>/dev/null || true)
  if [ -n "$have" ]; then
    cp "$have" "$dir/"
  else
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8
  fi
}

for name in peer-lf peer-swift; do
  rm -rf "${DEST:?}/$name"
  mkdir -p "$DEST/$name"
done
fetch "$DEST/peer-lf" "${LF[@]}" "${COMMON[@]}"
deepspeed_wheel "$DEST/peer-lf"
fetch "$DEST/peer-swift" "${SWIFT[@]}" "${COMMON[@]}"
# Not a peer's: the benchmark's own process dequantizes the quality model's GGUF with
# transformers, which needs the gguf package (absent on the GPU machine).
mkdir -p "$DEST/peer-lf/chatft-extras"
fetch "$DEST/peer-lf/chatft-extras" gguf==0.19.0

for name in peer-lf peer-swift; do
  n=$(ls "$DEST/$name"/*.whl | wc -l)
  echo "$name: $n wheels, $(du -sh "$DEST/$name" | cut -f1)"
done
