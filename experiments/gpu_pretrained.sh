#!/usr/bin/env bash
# Time experiments/pretrained.py on a random checkpoint shaped like state-spaces/mamba2-130m (d_model 768,
# 24 layers, vocab 50277 padded to 50288, d_state 128, headdim 64; mamba_ssm layout), on one GPU or any device.
# Self-contained: it writes the checkpoint and random token ids itself (nothing downloads) and needs only this
# repository installed (pip install -e .). Random weights run the same arithmetic as the official ones, so the
# times and memory hold for mamba2-130m; the losses mean nothing.
#
#   bash experiments/gpu_pretrained.sh                     # GPU: the base run at 64K, then every mitigation
#                                                          #      (default and tuned) and the forgetting curve
#   DEVICE=cpu LENGTH=32768 FULL=0 bash experiments/gpu_pretrained.sh runs/cpu_pretrained   # the CPU timing
#
# Environment: DEVICE (cuda), LENGTH scored tokens (65536), FULL=1 also runs the mitigations and the
# forgetting curve, THREADS torch CPU threads (0 = torch's default). Prints each run's wall time and peak
# memory (results.json has them too: wall_s, peak_rss_mib, peak_cuda_mib).
set -euo pipefail
OUT=${1:-runs/gpu_pretrained}
DEVICE=${DEVICE:-cuda}
LENGTH=${LENGTH:-65536}
FULL=${FULL:-1}
THREADS=${THREADS:-0}
VAL_LENGTH=16384
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

python - "$OUT" "$LENGTH" "$VAL_LENGTH" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoints import save_pretrained
from minimamba import Mamba2Config, Mamba2LM

out, length, val_length = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = Mamba2Config(d_model=768, n_layer=24, vocab_size=50277, d_state=128, headdim=64)  # mamba2-130m
if not (out / "ckpt" / "config.json").is_file():
    torch.manual_seed(0)
    save_pretrained(Mamba2LM(config), out / "ckpt", layout="mamba_ssm")
n = length + val_length + 2  # the scored stretch, then the validation stretch
np.save(out / "ids.npy", np.random.default_rng(0).integers(0, config.vocab_size, n))
print(f"random 130M-shaped checkpoint in {out / 'ckpt'}, {n} random token ids in {out / 'ids.npy'}")
EOF

python -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if '$DEVICE'.startswith('cuda') else '$DEVICE')"
run() {  # run NAME FLAGS...: one timed invocation, then its wall time and peak memory
  local name=$1; shift
  local cmd=(python -m experiments.pretrained --model "$OUT/ckpt" --text "$OUT/ids.npy" --length "$LENGTH"
             --val_length "$VAL_LENGTH" --device "$DEVICE" --threads "$THREADS" --out_dir "$OUT/$name" "$@")
  echo "+ ${cmd[*]}"
  /usr/bin/env time -v "${cmd[@]}" > "$OUT/$name.log" 2> "$OUT/$name.err" || { tail -20 "$OUT/$name.err"; exit 1; }
  python -c "import json; r = json.load(open('$OUT/$name/results.json')); print('$name:', {k: r.get(k) for k in ('device', 'wall_s', 'peak_rss_mib', 'peak_cuda_mib')})"
  grep -E "Elapsed|Maximum resident" "$OUT/$name.err" || true
}
run base --mitigations none
if [ "$FULL" = 1 ]; then
  run full --forgetting_curve
fi
