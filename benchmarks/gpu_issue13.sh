#!/usr/bin/env bash
# Issue #13's GPU measurements, on a lent GPU machine, after `bash scripts/device_prep.sh` here;
# with the device tool: run(command="bash benchmarks/gpu_issue13.sh STAGE", carry=[".device"]).
# Each stage fits one call (10 minutes at most); the log comes back as $OUT/gpu13-STAGE.log.
#   tests    the gpu-marked tests (tests/test_batched.py, test_masks.py, test_stats.py)
#   batched  K candidates per step: benchmarks/batched.py --device cuda --ks 1,4,16,64 (target:
#            >= 50,000 full CIFAR ResNet-20 proxies per H100-hour)
#   proxies  the single-candidate CIFAR proxies, masked and pruned, on the GPU (benchmarks/search.py)
#   driver   the driver's share of the default digits search with 1 and 4 simplify processes,
#            in-process and (where Ray is installed) on a one-GPU Ray worker
set -uo pipefail
stage=${1:?stage: tests, batched, proxies or driver}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EVOPRUNE_CACHE=$PWD/.device/cache EVOPRUNE_DATA_ROOT=$PWD/.device/data
out=${OUT:-.}/gpu13-$stage.log
# -P below: the checkout's evoprune/ folder must not shadow the package installed in /tmp/site
common=(--device cuda --data-root .device/data --cache-dir .device/cache)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    case $stage in
        tests) python3 -P -m pytest -q -m gpu -p no:cacheprovider tests/test_batched.py tests/test_masks.py tests/test_stats.py ;;
        batched) python3 benchmarks/batched.py "${common[@]}" --ks 1,4,16,64 ;;
        proxies) python3 benchmarks/search.py "${common[@]}" --skip-digits --train masked,pruned --cifar-candidates 6 ;;
        driver)  # a pool too where the machine has Ray (too big to carry in .device)
            pools=0; python3 -c "import ray" 2>/dev/null && pools=0,1 || echo "no Ray here: in-process only"
            python3 benchmarks/search.py "${common[@]}" --skip-cifar --simplify-processes 1,4 \
                --digits-workers $pools --gpus-per-worker 1 ;;
        *) echo "error: unknown stage $stage" >&2; exit 2 ;;
    esac
} 2>&1 | tee "$out"
