#!/usr/bin/env bash
# GPU check (run by hand on a machine with CUDA; CI has none).
# Prints one JSON line: train-step medians/ratios for SAM ViT-B at 1024 px with bf16
# autocast (SALT vs LoRA vs S-SAM vs decoder vs prompts only), peak CUDA memory, and
# the demo (fine-tune SALT on LiteMedSAM + propagate the embedded sample) on the GPU.
# Expected to finish in under 5 minutes on a recent data-centre GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
"$PY" -m SALTSegmentLib.cli bench speed --models sam_vit_b --vit-input-size 1024 --repeats 3 --out "$OUT/bench" \
    > "$OUT/speed.json"
start=$(date +%s)
"$PY" -m SALTSegmentLib.cli demo --out "$OUT/demo" --device cuda > "$OUT/demo.txt"
end=$(date +%s)
"$PY" - "$OUT" "$((end - start))" <<'PYEOF'
import json, sys
out, demo_seconds = sys.argv[1], int(sys.argv[2])
speed = json.load(open(f"{out}/speed.json"))
report = json.load(open(f"{out}/demo/report.json"))
print(json.dumps({"speed": speed, "demo_seconds": demo_seconds,
                  "demo_mean_dice_unlabelled": report.get("mean_dice_unlabelled_slices"),
                  "demo_timings": report.get("timings")}))
PYEOF
