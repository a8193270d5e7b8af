#!/usr/bin/env bash
# Prepares bench/gpu/check.sh's payload, here (with network), for a GPU machine without it:
#   bash bench/gpu/prepare.sh /path/to/ComfyUI
# - .comfy/ComfyUI: the parts of that ComfyUI checkout the bench imports (code only; no tests, docs, tokenizer data
#   or frontend), about 10 MB;
# - .whl/: Python 3.12 x86-64 wheels of what the bench's import path needs beyond a CUDA PyTorch image (which holds
#   torch, numpy, transformers, accelerate, peft, safetensors, aiohttp, pillow, ...), about 16 MB; check.sh installs
#   only those the machine lacks or has older. PyAV is stubbed (the bench uses no video; its wheel is 36 MB) and
#   comfy-kitchen comes as its pure-Python wheel.
# Both folders go to .git/info/exclude: fetched code and wheels never enter the repository. Then, for the device
# tool:  run(command="BENCH_TIMEOUT=510 bash bench/gpu/check.sh", carry=[".whl", ".comfy"], timeout_s=590)
set -eu -o pipefail
src=${1:?usage: bash bench/gpu/prepare.sh /path/to/ComfyUI}
cd "$(dirname "$0")/../.."
for d in /.comfy/ /.whl/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .comfy/ComfyUI && mkdir -p .comfy/ComfyUI
(cd "$src" && tar -cf - --exclude='*tokenizer*/*.json' --exclude='*tokenizer*/*.txt' --exclude='*tokenizer*/*.model' \
    --exclude='__pycache__' \
    comfy comfy_api comfy_execution comfy_extras app api_server middleware utils alembic_db models comfy_config \
    ./*.py pyproject.toml requirements.txt alembic.ini LICENSE) | tar -xf - -C .comfy/ComfyUI
mkdir -p .comfy/ComfyUI/input .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl \
    alembic==1.20.1 annotated_types==0.8.0 blake3==1.0.11 comfy_aimdo==0.4.13 diffusers==0.42.1 frozenlist==1.8.0 \
    importlib_metadata==8.7.0 mako==1.4.3 pydantic==2.14.4 pydantic_core==2.50.5 sqlalchemy==2.1.9 torchsde==0.2.6 \
    trampoline==0.1.2 typing_extensions==4.16.0 typing_inspection==0.4.5
python3 -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.12 -d .whl \
    comfy_kitchen==0.2.31
du -sh .comfy .whl
