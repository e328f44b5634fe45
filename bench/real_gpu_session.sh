#!/bin/bash
# The real-GPU session of docs/reference/fidelity.md, as it ran on an NVIDIA H200:
#   1. the fidelity bench (bench/real_gpu.py): real vs simulated, stock / graceful-oom / guard;
#   2. `pytest --metal-oom --metaloom-real-device` for stock and graceful-oom, then the GPU
#      must hold no helper memory any more;
#   3. the same session interrupted with SIGTERM mid-drive: the helper must be gone and its
#      memory given back.
# Run from the directory holding pytest_metaloom/ (mlx[cuda13], mlx-lm, PyTorch importable).
# Usage: real_gpu_session.sh [bench|pytest|all]  (two device calls: bench, then pytest)
# OUT: where the tables and logs go. BUDGET: seconds for step 1 (default 450).
set -u
STEP=${1:-all}
OUT=${OUT:-out}
mkdir -p "$OUT"
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; }

if [ "$STEP" != pytest ]; then
echo "== 1. fidelity bench"
timeout 540 python3 bench/real_gpu.py --out "$OUT" --budget "${BUDGET:-450}" --workers 16 \
    ${OVERLAY:+--overlay "$OVERLAY"} > "$OUT/bench.txt" 2>&1
echo "bench rc=$? ($(grep -c '^real ' "$OUT/bench.txt") real, $(grep -c '^sim ' "$OUT/bench.txt") simulated runs)"
echo "GPU memory used after the bench: $(used) MiB; compute apps: [$(apps)]"
fi
[ "$STEP" = bench ] && exit 0

echo "== 2. pytest --metal-oom --metaloom-real-device"
timeout 110 python3 -m pytest -p pytest_metaloom.plugin -p no:cacheprovider --metal-oom \
    --metaloom-real-device --metaloom-patch-set stock --metaloom-patch-set patchsets/graceful-oom \
    --metaloom-report="$OUT/pytest-real.json" -rA > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; grep -E "^(PASSED|FAILED|XFAIL|SKIPPED|ERROR)|real-device-tool_loop.*(passed|failed|xfail)| in [0-9.]+s" "$OUT/pytest.txt" | tail -8
sleep 1; echo "GPU memory used after pytest: $(used) MiB; compute apps: [$(apps)]"

echo "== 3. SIGTERM mid-drive"
python3 -m pytest -p pytest_metaloom.plugin -p no:cacheprovider --metal-oom --metaloom-real-device \
    --metaloom-headroom 100GiB --metaloom-turn-words 3000 > "$OUT/sigterm.txt" 2>&1 &
P=$!
for _ in $(seq 90); do [ "$(used)" -gt 30000 ] && break; sleep 1; done
echo "held by the helper mid-drive: $(used) MiB; compute apps: [$(apps)]"
sleep 2; kill -TERM $P; timeout 60 tail --pid=$P -f /dev/null; wait $P; echo "pytest after SIGTERM rc=$?"
sleep 2; echo "GPU memory used after SIGTERM: $(used) MiB; compute apps: [$(apps)]"
tail -5 "$OUT/sigterm.txt"
