#!/bin/bash
# GPU run 2: CuPy tests incl. 2-rank ones (Open MPI of the image), determinism, bench
export PYTHONPATH=$PWD:/tmp/pyx
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
mkdir -p /tmp/pyx && python3 -m zipfile -e .devrun/wheels/pytest_isolate_mpi-*.whl /tmp/pyx
echo "== pytest -m gpu"; timeout 300 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning tests 2>&1 | tail -15
echo "== determinism"; timeout 60 python3 .devrun/determinism.py 2>&1 | tail -12
echo "== bench"; timeout 200 python3 -m ptmpi bench --gpu --sizes 64,128 --repeat 3 --no-astra --json $OUT/bench-gpu.json > $OUT/bench-gpu.txt 2>&1; tail -30 $OUT/bench-gpu.txt
echo "== CPU scaling on the device's cores (Open MPI)"; nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket" 
timeout 200 python3 -m ptmpi bench --scaling --ranks 1,2,4 --repeat 5 --json $OUT/scaling-device.json > $OUT/scaling-device.txt 2>&1; tail -30 $OUT/scaling-device.txt
