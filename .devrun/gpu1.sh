#!/bin/bash
# GPU checks: environment, CuPy test cases, --slabs on the GPU (1 and 2 ranks if an MPI launcher exists)
set -x
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 --version; which mpirun mpiexec orterun 2>&1; python3 -c "import mpi4py; print(mpi4py.get_config())" 2>&1 | tail -2
python3 -c "import cupy, numba, numpy, scipy; print(cupy.__version__, numba.__version__, numpy.__version__, scipy.__version__)"
timeout 200 python3 -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning tests 2>&1 | tail -8
cd $OUT
python3 -m ptmpi simulate --preset demo -o demo.h5 > /dev/null 2>&1
python3 -m ptmpi reconstruct demo.h5 -o g1.h5 --gpu --iterations 20 --no-figures 2>&1 | tail -2
python3 -m ptmpi reconstruct demo.h5 -o g1s.h5 --gpu --iterations 20 --no-figures --slabs 1 2>&1 | tail -1
if which mpirun > /dev/null 2>&1; then
  for s in 1 2; do
    timeout 120 mpirun --allow-run-as-root --oversubscribe -n 2 python3 -m ptmpi reconstruct demo.h5 -o g2s$s.h5 --gpu --iterations 20 --no-figures --slabs $s 2>&1 | tail -2
  done
fi
python3 - <<'PY'
import h5py, numpy as np, glob
ref = h5py.File('g1.h5')['entry_1/image_1/data'][()]
for f in sorted(glob.glob('g*.h5')):
    u = h5py.File(f)['entry_1/image_1/data'][()]
    print(f, "max rel diff vs 1 rank:", float(np.abs(u - ref).max() / np.abs(ref).max()))
PY
rm -f demo.h5
