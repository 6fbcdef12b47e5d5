#!/usr/bin/env bash
# Nsight Compute profile of one wgmma call (4096x4096, M = 256, group 128) on a Hopper GPU:
#   bash bench/ncu_wgmma.sh OUTDIR
# writes OUTDIR/wgmma.ncu-rep, the details page and the per-SASS stall samples (CSV), and prints
# the stall reasons by share and the 12 most-sampled instructions.
set -euo pipefail
out=${1:?usage: bench/ncu_wgmma.sh OUTDIR}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu not found" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$out" && pwd)
cd "$here"  # not the repository root, whose klaq/ folder would shadow the installed package
"$ncu" --set full -k regex:gemm_wgmma -s 2 -c 1 -f -o "$out/wgmma" python - <<PY
import sys; sys.path.insert(0, "$here")
import torch
from kernels import random_qweight
from klaq.kernels.triton_w4a16 import repack
from klaq.kernels.gluon_w4a16 import gemm_wgmma
w = repack(random_qweight(4096, 4096), "cuda")
x = torch.randn(256, 4096, device="cuda", dtype=torch.float16)
for _ in range(3):
    gemm_wgmma(x, w)
torch.cuda.synchronize()
PY
"$ncu" --import "$out/wgmma.ncu-rep" --page details > "$out/details.txt"
"$ncu" --import "$out/wgmma.ncu-rep" --page source --print-source sass --csv > "$out/sass.csv"
python - "$out/sass.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr, data = rows[1], rows[2:]
col = hdr.index("Warp Stall Sampling (All Samples)")
stalls = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
num = lambda v: float(v or 0)
tot = {hdr[i]: sum(num(r[i]) for r in data) for i in stalls}
s = sum(tot.values())
print("stall reasons:", ", ".join(f"{k[6:]} {v / s:.1%}" for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:8]))
alls = sum(num(r[col]) for r in data)
for r in sorted(data, key=lambda r: -num(r[col]))[:12]:
    print(f"{num(r[col]) / alls:6.1%}  {r[1][:64]:64s} {hdr[max(stalls, key=lambda i: num(r[i]))][6:]}")
PY
