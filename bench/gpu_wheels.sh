#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks, as wheels for its Python 3.12 on x86-64 Linux,
# for bench/gpu_check.py to install there (the machine reaches no package registry):
#
#     bash bench/gpu_wheels.sh [OUT_FOLDER]        # default bench/gpu_wheels (ignored by git; carried)
#
# The image has python 3.12, torch 2.11.0+cu130, transformers 5.17, peft, accelerate, pluggy,
# safetensors, pytest, numpy, pandas, pyarrow, requests, pyyaml, einops, msgpack, ninja, psutil,
# py-cpuinfo, xxhash, fsspec, aiohttp, jinja2, ... (the device library's KINDS.md lists them all).
# What it lacks, from each package's Requires-Dist read against that list:
#   pydantic          zenalign, DeepSpeed   -> pydantic-core, annotated-types, typing-inspection
#   deepspeed         engine.backend        -> hjson
#   datasets          TRL's prompts         -> dill, multiprocess
#   trl               the benchmark's other side (its needs are in the image or above)
# DeepSpeed publishes no wheel, only its source: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0; any op it needs is compiled on the GPU machine at first use).
# Floors (floors/): packages the image has, perhaps older than the ones above require;
# gpu_check.py installs one only where the image's version is lower: typing-extensions (pydantic
# needs >= 4.16) and setuptools (zenalign's build backend needs >= 77).
# One version of each: the versions this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/gpu_wheels}"

MISSING="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
         hjson==3.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0"
FLOORS="typing-extensions==4.16.0 setuptools==84.2.1"
DEEPSPEED="deepspeed==0.19.8"

rm -rf "$out"
mkdir -p "$out/floors" "$out/.sdist"
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# shellcheck disable=SC2086
python3 -m pip download -q "${target[@]}" -d "$out" $MISSING
# shellcheck disable=SC2086
python3 -m pip download -q "${target[@]}" -d "$out/floors" $FLOORS
python3 -m pip download -q --no-deps --no-binary=:all: -d "$out/.sdist" "$DEEPSPEED"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$out"/.sdist/*
rm -rf "$out/.sdist"

ls -l "$out"/*.whl "$out"/floors/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
bytes=$(cat "$out"/*.whl "$out"/floors/*.whl | wc -c)
limit=$((64 * 1024 * 1024))
echo "$(ls "$out"/*.whl "$out"/floors/*.whl | wc -l) wheels, $bytes bytes ($((bytes / 1024)) KiB) in $out"
if [ "$bytes" -ge "$limit" ]; then
    echo "bench/gpu_wheels.sh: over the 64 MiB that can travel to the GPU machine" >&2
    exit 1
fi
