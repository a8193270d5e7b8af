#!/usr/bin/env bash
# One-shot GPU check: bench/bench_gpu_wan14b.py (measured peak VRAM of Stage III at 480p x 81 frames and Stage II on a
# random fp8 Wan 2.1 I2V 14B, as on a 24 GB card) on a bare machine with a CUDA GPU, python3 and torch, and no network.
# Prepare here first (bench/gpu/prepare.sh: a ComfyUI copy in .comfy/ComfyUI and wheels of what such a machine may
# lack in .whl/, both ignored by git), carry both, then run from the repo root:   bash bench/gpu/check.sh
# Env: OUT (log folder, default /tmp/gpu_check_out), SMOKE=0 skips the CPU smoke, BENCH_TIMEOUT (s, default 500),
# BENCH_ARGS (default "--vram-gib 24"), WHL (wheel folder, default .whl).
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
SITE=/tmp/site
export COMFYUI_PATH=$REPO/.comfy/ComfyUI
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

step() { echo; echo "=== $* ($(date +%T))"; }

main() {
  step "install carried wheels missing here (into $SITE, nothing already installed is shadowed unless older)"
  local wheels
  wheels=$(WHL=${WHL:-.whl} python3 - <<'EOF'
import glob, importlib.metadata as md, os, sys
from packaging.version import Version
for w in sorted(glob.glob(os.path.join(os.environ["WHL"], "*.whl"))):
    name, ver = w.split("/")[-1].split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is not None and Version(have) >= Version(ver):
        print(f"  have {name} {have} (carried {ver}): skipped", file=sys.stderr)
        continue
    print(f"  install {name} {ver}" + (f" (here {have})" if have else ""), file=sys.stderr)
    print(w)
EOF
  ) || return 3
  rm -rf "$SITE"; mkdir -p "$SITE"
  if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        $wheels; then
      echo "pip failed: unzipping the wheels instead"
      for w in $wheels; do python3 -m zipfile -e "$w" "$SITE" || return 3; done
    fi
  fi
  export PYTHONPATH=$SITE
  python3 - <<'EOF' || true
import importlib.metadata as md
from packaging.requirements import Requirement
bad = []
for d in md.distributions(path=["/tmp/site"]):
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{d.metadata['Name']} needs {req} (absent)"); continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            bad.append(f"{d.metadata['Name']} needs {req} (have {have})")
print("  dependencies:", "all satisfied" if not bad else "\n  ".join(["PROBLEMS:"] + bad))
EOF

  step "machine"
  nvidia-smi || true
  nproc; free -g | head -2
  python3 - <<'EOF' || return 4
import sys, torch, numpy, transformers
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| numpy", numpy.__version__, "| transformers",
      transformers.__version__, "| triton", tv)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
EOF

  if [ "${SMOKE:-1}" != 0 ]; then
    step "smoke: --smoke-cpu (the same code path, tiny model, CPU; import check)"
    timeout -s INT -k 10 90 python3 bench/gpu/run_bench.py --smoke-cpu
    local rc=$?
    if [ $rc = 124 ]; then echo "smoke timed out (90 s): going on to the GPU run"
    elif [ $rc != 0 ]; then echo "SMOKE FAILED rc=$rc"; return 5; fi
  fi

  step "GPU run: bench_gpu_wan14b.py ${BENCH_ARGS:---vram-gib 24}"
  nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu,power.draw --format=csv -l 5 \
    > "$OUT/nvidia_smi.csv" 2>&1 &
  local smi=$!
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "${BENCH_TIMEOUT:-500}" python3 bench/gpu/run_bench.py ${BENCH_ARGS:---vram-gib 24}
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  echo "max memory.used seen by nvidia-smi (MiB): $(awk -F', ' 'NR>1{v=$2+0; if(v>m)m=v} END{print m+0}' "$OUT/nvidia_smi.csv")"
  [ $rc = 124 ] && echo "GPU RUN TIMED OUT after ${BENCH_TIMEOUT:-500} s (SIGINT traceback above shows where)"
  echo "bench rc=$rc"
  return $rc
}

main 2>&1 | tee "$OUT/gpu_log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check rc=$rc" | tee -a "$OUT/gpu_log.txt"
exit "$rc"
