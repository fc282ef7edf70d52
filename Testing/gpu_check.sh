#!/usr/bin/env bash
# GPU check (run by hand on a machine with CUDA; CI has none).
# Prints one JSON line: train-step medians/ratios for SAM ViT-B at 1024 px with bf16
# autocast (SALT vs LoRA vs S-SAM vs decoder vs prompts only), peak CUDA memory, and
# the demo (fine-tune SALT on LiteMedSAM + propagate the embedded sample) on the GPU, and, with 2 or
# more GPUs, the same training as 2 torchrun ranks over NCCL (one GPU: it says so and skips that part).
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
demo_seconds=$((end - start))
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
ddp_seconds=-1
if [ "$gpus" -ge 2 ]; then
    mkdir -p "$OUT/ddp"
    start=$(date +%s)
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m SALTSegmentLib.cli train \
        --image Resources/SampleData/ch2_deep_grey_t1.nrrd --labels Resources/SampleData/ch2_deep_grey_labels.seg.nrrd \
        --slices 13,22,30,39,48 --device cuda --out "$OUT/ddp/adapter.safetensors" --progress json > "$OUT/ddp.jsonl"
    ddp_seconds=$(( $(date +%s) - start ))
else
    echo "one GPU ($gpus): skipping the 2-rank torchrun training (it needs 2 or more GPUs)" >&2
fi
"$PY" - "$OUT" "$demo_seconds" "$ddp_seconds" <<'PYEOF'
import json, sys
out, demo_seconds, ddp_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
speed = json.load(open(f"{out}/speed.json"))
report = json.load(open(f"{out}/demo/report.json"))
ddp = "skipped: fewer than 2 GPUs"
if ddp_seconds >= 0:   # the 2-rank run's result event (rank 0 alone reports)
    events = [json.loads(line) for line in open(f"{out}/ddp.jsonl") if line.startswith("{")]
    summary = next(e for e in events if e.get("event") == "result")["summary"]
    ddp = {"seconds": ddp_seconds, "processes": summary.get("processes"), "steps": summary.get("steps"),
           "final_loss": summary.get("final_loss")}
print(json.dumps({"speed": speed, "demo_seconds": demo_seconds,
                  "demo_mean_dice_unlabelled": report.get("mean_dice_unlabelled_slices"),
                  "demo_timings": report.get("timings"), "two_rank_training": ddp}))
PYEOF
