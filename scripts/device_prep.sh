#!/usr/bin/env bash
# Prepare what a lent GPU machine needs for the #13 measurements (benchmarks/gpu_issue13.sh),
# here, where the package registries can be reached. The machine has Python 3.12 with torch,
# torchvision (torch 2.11 in 2026-11, not our 2.14.1 pin), sympy, typer, rich, scikit-learn,
# matplotlib, tqdm, pytest and hypothesis, and no network: our other dependencies travel as
# wheels, with the CIFAR-10 subset and (when this machine has it) the pretrained CIFAR
# ResNet-20, in .device/ (in .gitignore: carry it).
#
#   bash scripts/device_prep.sh [DATA_ROOT=../shared/data] [CACHE_DIR=$EVOPRUNE_CACHE or ~/.cache/evoprune]
#   then, with the device tool: run(command="bash benchmarks/gpu_issue13.sh tests", carry=[".device"])
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
cache=${2:-${EVOPRUNE_CACHE:-$HOME/.cache/evoprune}}
[ -d "$data/cifar-10-batches-py" ] || { echo "error: no CIFAR-10 subset under $data" >&2; exit 2; }
rm -rf .device && mkdir -p .device/wheels .device/data .device/cache
py=${PYTHON:-python3}
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels deap torch-pruning sqlalchemy alembic mako typing-extensions
$py -m pip wheel -q --no-deps -w .device/wheels .
cp -r "$data/cifar-10-batches-py" .device/data/
cp "$data"/README.md "$data"/SHA256SUMS .device/data/ 2>/dev/null || true
cp "$cache"/cifar10-resnet20-* .device/cache/ 2>/dev/null || echo "no pretrained CIFAR ResNet-20 in $cache: the machine pretrains it (about a minute on a GPU)"
du -sh .device
