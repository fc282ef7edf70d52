"""Bad inputs through the real ``saltsegment`` CLI: one clear line each, a non-zero exit, nothing overwritten.

Every case runs ``python -m SALTSegmentLib.cli ...`` as a subprocess. The
cases run two at a time from one module fixture (each start costs seconds of
imports) and the parametrized tests check their outcomes: the exit code, one
``error:`` line (plus at most one ``hint:``), no traceback, and the bytes of
an output file that existed before are unchanged. Inputs are small crops of
the embedded real sample; cases that must get *past* a check (an accepted
input) add a cheap failure after it (``--segments nope``) and expect that
later message instead.

A few conditions cannot be produced by a file (a full disk, running out of
memory in a training step); they run ``cli.main`` in-process with the writer
or the step patched to raise what the hardware would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SALTSegmentLib.volume_io import Segment, VolumeGeometry, read_label_map, write_label_map

PREVIOUS = b"previous output: must survive a failed run\n"
CROP_FIRST, CROP_COUNT = 28, 8
DRAWN = [2, 6]


@dataclass
class Case:
    id: str
    args: list[str]                       # after the command; {x} names a fixture file, {out} the output
    message: str                          # regex the error line must match (after "error: ")
    exit: int = 1
    command: str = "train"
    out: str = "out.safetensors"          # created beforehand with PREVIOUS unless it cannot be
    env: dict[str, str] = field(default_factory=dict)
    hint: str | None = None               # regex the hint line must match, when given


NO_MEMORY_LIMIT = {"SALTSEGMENT_MEMORY_LIMIT_BYTES": str(1 << 50)}
TRAIN = ["--image", "{image}", "--labels", "{drawn}"]
PROPAGATE = ["--image", "{image}", "--adapter", "{adapter}"]

CASES = [
    # --- files that are missing or not volumes
    Case("missing image", ["--image", "{case}/nope.nrrd", "--labels", "{drawn}"], r"File not found: .*nope\.nrrd"),
    Case("garbage image", ["--image", "{garbage_nrrd}", "--labels", "{drawn}"], r"Cannot read .*garbage\.nrrd"),
    Case("truncated image", ["--image", "{truncated_image}", "--labels", "{drawn}"], r"Cannot read .*truncated\.nrrd"),
    Case("folder without DICOM", ["--image", "{empty_folder}", "--labels", "{drawn}"], r"No DICOM series found"),
    # --- dimensions, components, intensities
    Case("2D image", ["--image", "{image_2d}", "--labels", "{drawn}"], r"is 2D; a 3D volume is needed"),
    Case("4D image", ["--image", "{image_4d}", "--labels", "{drawn}"], r"is 4D; a 3D volume is needed"),
    Case("RGB (3-component) image", ["--image", "{image_rgb}", "--labels", "{drawn}"],
         r"has 3 components per voxel; a scalar"),
    Case("constant image", ["--image", "{constant}", "--labels", "{drawn}"], r"The image is constant"),
    Case("all-NaN image", ["--image", "{all_nan}", "--labels", "{drawn}"], r"no finite values \(all NaN or Inf\)"),
    Case("volume too big for memory (header only)", ["--image", "{huge_header}", "--labels", "{drawn}"],
         r"Training on this 4000 x 4000 x 4000 volume needs about [\d.]+ GiB of memory \(volume [\d.]+ GiB, .*\) "
         r"but only", hint="crop"),
    # --- label maps
    Case("labels: other size", [*TRAIN[:2], "--labels", "{labels_size}"], r"not on the image grid \(size ",
         hint="--resample-labels"),
    Case("labels: other spacing, origin and direction", [*TRAIN[:2], "--labels", "{labels_moved}"],
         r"not on the image grid \(spacing \(.*\); origin \(.*\); direction \("),
    Case("labels: other grid, --resample-labels: accepted",
         [*TRAIN[:2], "--labels", "{labels_moved}", "--resample-labels", "--segments", "nope"],
         r"No segment named 'nope'"),
    Case("labels: empty segmentation", [*TRAIN[:2], "--labels", "{empty_seg}"], r"No labelled slice"),
    Case("labels: empty plain label map", [*TRAIN[:2], "--labels", "{empty_plain}"], r"holds no segment"),
    Case("labels: negative values", [*TRAIN[:2], "--labels", "{labels_negative}"], r"holds negative labels"),
    Case("labels: fractional values", [*TRAIN[:2], "--labels", "{labels_fraction}"], r"holds non-integer values"),
    Case("labels: values above 65535", [*TRAIN[:2], "--labels", "{labels_huge}"], r"holds labels above 65535"),
    Case("segment with no voxels", [*TRAIN[:2], "--labels", "{with_empty_segment}", "--segments", "Thalamus_R"],
         r"Segment 'Thalamus_R' has no voxels in the label map"),
    Case("unknown segment name", [*TRAIN, "--segments", "nope"], r"No segment named 'nope' .*Thalamus_L"),
    Case("labelled slice out of range", [*TRAIN, "--slices", "99"], r"Labelled slice\(s\) \[99\] outside 0\.\.7"),
    Case("chosen slice not drawn", [*TRAIN, "--slices", "0"], r"Segment 'Thalamus_L' has no voxels"),
    Case("marked absent where it is drawn", [*TRAIN, "--absent", "Thalamus_L=2"],
         r"'Thalamus_L' is drawn on slice\(s\) \[2\], which are marked without it"),
    Case("marked absent: a segment not trained", [*TRAIN, "--absent", "Putamen_L=3"],
         r"marked absent: 'Putamen_L' is not a selected segment \(Thalamus_L\)"),
    Case("unknown intensity setting", [*TRAIN, "--intensity", "foo"], r"Unknown intensity setting 'foo'"),
    # --- models and weights (a ViT at 1024 px may not fit this machine's memory: the limit is lifted so that
    #     the weights checks, which come after the memory check, are reached)
    Case("unknown model id", [*TRAIN, "--model", "nope"], r"Unknown model 'nope'; known models: lite_medsam",
         hint="saltsegment models"),
    Case("weights file missing", [*TRAIN, "--weights", "{case}/nope.pth"], r"Weights file not found"),
    Case("SAM weights not downloaded", [*TRAIN, "--model", "sam_vit_b"],
         r"sam_vit_b weights are not on this machine .*--download sam_vit_b",
         env={"SALTSEGMENT_CACHE": "{case}", **NO_MEMORY_LIMIT}),
    Case("wrong file for sam_vit_b", [*TRAIN, "--model", "sam_vit_b", "--weights", "{small_pth}"],
         r"sam_vit_b weights file .* fails its sha256 check", env=NO_MEMORY_LIMIT),
    Case("wrong architecture for medsam_vit_b", [*TRAIN, "--model", "medsam_vit_b", "--weights", "{small_pth}"],
         r"is not a medsam_vit_b checkpoint: \d+ missing", env=NO_MEMORY_LIMIT),
    Case("pickle-bearing weights", [*TRAIN, "--model", "medsam_vit_b", "--weights", "{pickle_pth}"],
         r"Cannot read medsam_vit_b weights from .*pickle\.pth: Weights only load failed\. This file",
         env=NO_MEMORY_LIMIT),
    # --- outputs
    Case("output folder missing", [*TRAIN, "--out", "{case}/no_such_folder/a.safetensors"],
         r"Output folder does not exist: .*no_such_folder", out=""),
    Case("output folder is a file", [*TRAIN, "--out", "{garbage_nrrd}/a.safetensors"],
         r"Output folder is a file, not a folder", out=""),
    # --- outputs that are inputs: refused before anything is read or written
    Case("train: --out is the --labels file", [*TRAIN, "--out", "{drawn}"],
         r"The output .*drawn\.seg\.nrrd is the --labels input \(.*\); writing it would destroy the input", out="",
         hint="choose another --out"),
    Case("train: --out is the image, spelt with ./", [*TRAIN, "--out", "{case}/./image.nrrd"],
         r"is the --image input", out=""),
    Case("train: --out is the labels, spelt through the parent folder", [*TRAIN, "--out", "{via_parent}/drawn.seg.nrrd"],
         r"is the --labels input", out=""),
    Case("train: --out is a symbolic link to the labels", [*TRAIN, "--out", "{drawn_symlink}"],
         r"drawn_symlink\.seg\.nrrd is the --labels input", out=""),
    Case("train: --out is a hard link to the labels", [*TRAIN, "--out", "{drawn_hardlink}"],
         r"drawn_hardlink\.seg\.nrrd is the --labels input", out=""),
    Case("train: --out is the weights file", [*TRAIN, "--model", "medsam_vit_b", "--weights", "{small_pth}",
                                               "--out", "{small_pth}"], r"small\.pth is the --weights input", out=""),
    Case("train: adapter output not .safetensors", TRAIN,
         r"Cannot write an adapter to 'out\.nrrd': adapter files end in \.safetensors", out="out.nrrd",
         hint="adapter.safetensors"),
    Case("propagate: --out is the image", [*PROPAGATE, "--out", "{image}"], r"image\.nrrd is the --image input",
         command="propagate", out=""),
    Case("propagate: --out is the labels", [*PROPAGATE, "--labels", "{drawn}", "--out", "{drawn}"],
         r"is the --labels input", command="propagate", out=""),
    Case("propagate: --out is the adapter", [*PROPAGATE, "--out", "{adapter}"], r"is the --adapter input",
         command="propagate", out=""),
    Case("propagate: the output's data file is the image's", ["--image", "{image_nhdr}", "--adapter", "{adapter}",
                                                              "--out", "{case}/b.nhdr"],
         r"b\.nhdr writes b\.raw\.gz, which is the --image input", command="propagate", out=""),
    # --- adapters (propagate)
    Case("adapter: garbage bytes", ["--image", "{image}", "--adapter", "{garbage_nrrd}"],
         r"is not a safetensors file", command="propagate", out="seg.seg.nrrd", hint="saltsegment train"),
    Case("adapter: truncated", ["--image", "{image}", "--adapter", "{adapter_truncated}"],
         r"is truncated or corrupt", command="propagate", out="seg.seg.nrrd"),
    Case("adapter: foreign safetensors", ["--image", "{image}", "--adapter", "{adapter_foreign}"],
         r"a safetensors file but not a SALTSegment adapter", command="propagate", out="seg.seg.nrrd"),
    Case("adapter: another format version", ["--image", "{image}", "--adapter", "{adapter_version}"],
         r"uses adapter format version 3; this SALTSegment .* reads versions 1, 2", command="propagate",
         out="seg.seg.nrrd"),
    Case("adapter: other base weights", ["--image", "{image}", "--adapter", "{adapter_other_weights}"],
         r"was trained on lite_medsam weights with sha256 000000000000\.\.\.", command="propagate",
         out="seg.seg.nrrd", hint="same base model"),
    Case("adapter: other base model", ["--image", "{image}", "--adapter", "{adapter_other_model}"],
         r"sam_vit_b weights are not on this machine", command="propagate", out="seg.seg.nrrd",
         env={"SALTSEGMENT_CACHE": "{case}"}),
    # --- propagate settings
    Case("slice range outside the volume", [*PROPAGATE, "--range", "5:99"], r"Slice range 5:99 is outside 0:7",
         command="propagate", out="seg.seg.nrrd"),
    Case("labels share no segment name with the adapter", [*PROPAGATE, "--labels", "{liver_seg}"],
         r"None of the adapter's segments \(Thalamus_L\) is drawn in liver\.seg\.nrrd \(matched by name; its "
         r"segments: Liver\)", command="propagate", out="seg.seg.nrrd", hint="--match-by value"),
    Case("negative slice in --range", [*PROPAGATE, "--range", "-1:5"], r"Slice range -1:5 is outside 0:7",
         command="propagate", out="seg.seg.nrrd"),
    Case("marked absent: not the adapter's segment", [*PROPAGATE, "--absent", "Putamen_L=3"],
         r"Marked absent: 'Putamen_L', not one of the adapter's segments \(Thalamus_L\)",
         command="propagate", out="seg.seg.nrrd"),
    Case("marked absent off the volume", [*PROPAGATE, "--absent", "Thalamus_L=9"],
         r"Thalamus_L marked absent on slice\(s\) \[9\], outside 0\.\.7", command="propagate", out="seg.seg.nrrd"),
    Case("marked absent where it is drawn (propagate)", [*PROPAGATE, "--labels", "{drawn}", "--absent", "Thalamus_L=6"],
         r"Thalamus_L is drawn on slice\(s\) \[6\], which are marked without it", command="propagate",
         out="seg.seg.nrrd"),
    Case("unknown output file type", [*PROPAGATE, "--out", "{case}/seg.txt"], r"Cannot write a label map to 'seg.txt'",
         command="propagate", out=""),
    Case("propagation too big for the memory limit", PROPAGATE,
         r"Propagating 1 segment over this 124 x 116 x 8 volume needs about [\d.]+ GiB of memory \(runtime .*\) "
         r"but only 1 MiB",
         command="propagate", out="seg.seg.nrrd", env={"SALTSEGMENT_MEMORY_LIMIT_BYTES": "1000000"}, hint="--range"),
    # --- evaluate
    Case("evaluate: grids differ", ["--pred", "{labels_moved}", "--ref", "{drawn}"],
         r"grids differ: spacing \(1\.5, 1\.5, 1\.5\) vs \(1\.0, 1\.0, 1\.0\)", command="evaluate", out=""),
    # --- an argparse usage error (exit 2); the others are checked in-process below
    Case("--threshold 2", [*PROPAGATE, "--threshold", "2"], r"argument --threshold: expected a number between 0 and 1",
         exit=2, command="propagate", out="seg.seg.nrrd"),
]


# --------------------------------------------------------------------------- inputs

def _write(array: np.ndarray, path: Path, like: sitk.Image | None = None, **geometry) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    for name, value in geometry.items():
        getattr(image, f"Set{name.capitalize()}")(value)
    sitk.WriteImage(image, str(path))
    return path


def _rewrite_adapter(source: Path, target: Path, edit_metadata=None, edit_values=None) -> Path:
    """A copy of an adapter with its header metadata (or the JSON inside it) edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if edit_values is not None:
        values = json.loads(metadata["saltsegment"])
        edit_values(values)
        metadata["saltsegment"] = json.dumps(values)
    if edit_metadata is not None:
        edit_metadata(metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


_ADAPTER_PARTS: dict = {}  # the model and metadata behind the fixture's adapter, for the save test


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickled code ran"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_image_path, sample_labels_path,
           write_untrained_adapter) -> dict[str, Path]:
    """Every file the cases name, built from an 8-slice crop of the embedded sample."""
    case = tmp_path_factory.mktemp("bad_inputs")
    files: dict[str, Path] = {"case": case}
    sample = sitk.ReadImage(str(sample_image_path))
    size = list(sample.GetSize())
    crop = sitk.RegionOfInterest(sample, [size[0], size[1], CROP_COUNT], [0, 0, CROP_FIRST])
    files["image"] = case / "image.nrrd"
    sitk.WriteImage(crop, str(files["image"]))
    geometry = VolumeGeometry.from_image(crop)
    voxels = sitk.GetArrayFromImage(crop)
    labels, _, segments = read_label_map(sample_labels_path)
    thalamus = np.where(labels[CROP_FIRST:CROP_FIRST + CROP_COUNT] == 1, 1, 0).astype(np.uint8)
    drawn = np.zeros_like(thalamus)
    drawn[DRAWN] = thalamus[DRAWN]
    files["drawn"] = write_label_map(case / "drawn.seg.nrrd", drawn, geometry, segments[:1])
    files["with_empty_segment"] = write_label_map(case / "two_segments.seg.nrrd", drawn, geometry, segments[:2])
    files["empty_seg"] = write_label_map(case / "empty.seg.nrrd", np.zeros_like(drawn), geometry, segments[:1])
    files["empty_plain"] = _write(np.zeros_like(drawn), case / "empty_plain.nrrd", crop)
    files["liver_seg"] = write_label_map(case / "liver.seg.nrrd", drawn, geometry, [Segment(1, "Liver")])
    files["drawn_symlink"] = case / "drawn_symlink.seg.nrrd"
    files["drawn_symlink"].symlink_to(files["drawn"])
    files["drawn_hardlink"] = case / "drawn_hardlink.seg.nrrd"
    os.link(files["drawn"], files["drawn_hardlink"])
    files["via_parent"] = Path(f"{case}/../{case.name}")
    # a detached image whose header (a.nhdr) names another data file (b.raw.gz)
    sitk.WriteImage(crop, str(case / "b.nhdr"), useCompression=True)
    files["image_nhdr"] = (case / "b.nhdr").rename(case / "a.nhdr")

    # images
    files["garbage_nrrd"] = case / "garbage.nrrd"
    files["garbage_nrrd"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["text_nii"] = case / "text.nii.gz"
    files["text_nii"].write_text("this is not a volume\n")
    raw = case / "raw.nrrd"
    sitk.WriteImage(crop, str(raw), useCompression=False)
    files["truncated_image"] = case / "truncated.nrrd"
    files["truncated_image"].write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    files["empty_folder"] = case / "empty_folder"
    files["empty_folder"].mkdir()
    files["image_2d"] = case / "image_2d.nrrd"
    sitk.WriteImage(crop[:, :, 3], str(files["image_2d"]))
    files["image_4d"] = case / "image_4d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([crop, crop]), str(files["image_4d"]))
    files["image_rgb"] = case / "image_rgb.nrrd"
    sitk.WriteImage(sitk.Compose(crop, crop, crop), str(files["image_rgb"]))
    files["constant"] = _write(np.full(voxels.shape, 7, np.float32), case / "constant.nrrd", crop)
    files["all_nan"] = _write(np.full(voxels.shape, np.nan, np.float32), case / "all_nan.nrrd", crop)
    some_nan = voxels.astype(np.float32)
    some_nan[0, :10] = np.nan
    some_nan[1, :10] = np.inf
    some_nan[2, :10] = -np.inf
    files["some_nan"] = _write(some_nan, case / "some_nan.nrrd", crop)
    files["uint32_huge"] = _write(voxels.astype(np.uint32) * np.uint32(16_000_000), case / "uint32.nrrd", crop)
    files["int64_huge"] = _write(voxels.astype(np.int64) * np.int64(3 * 10 ** 16), case / "int64.nrrd", crop)
    files["huge_header"] = case / "huge.mha"  # a header only: the voxels would take 238 GiB
    files["huge_header"].write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\n"
                                    "ElementSpacing = 1 1 1\nElementType = MET_FLOAT\nElementDataFile = huge.raw\n")

    # label maps off the grid, or with impossible values
    files["labels_size"] = _write(drawn[:-1], case / "labels_size.nrrd", None, spacing=crop.GetSpacing(),
                                  origin=crop.GetOrigin(), direction=crop.GetDirection())
    files["labels_moved"] = _write(drawn, case / "labels_moved.nrrd", crop, spacing=(1.5, 1.5, 1.5),
                                   origin=tuple(v + 5.0 for v in crop.GetOrigin()),
                                   direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    files["labels_negative"] = _write(drawn.astype(np.int16) - 1, case / "labels_negative.nrrd", crop)
    files["labels_fraction"] = _write(drawn.astype(np.float32) * 0.5, case / "labels_fraction.nrrd", crop)
    files["labels_huge"] = _write(drawn.astype(np.int32) * 70_000, case / "labels_huge.nrrd", crop)

    # weights
    files["small_pth"] = case / "small.pth"
    torch.save({"weight": torch.zeros(3)}, files["small_pth"])
    files["pickle_pth"] = case / "pickle.pth"
    files["pickle_marker"] = case / "PICKLE_RAN"
    torch.save({"weight": torch.zeros(3), "payload": _Exploit(files["pickle_marker"])}, files["pickle_pth"])

    # adapters: an untrained but valid one (no training needed to test refusals), and broken copies
    adapter, model, metadata = write_untrained_adapter(case / "adapter.safetensors", voxels.astype(np.float32),
                                                       segments[:1])
    _ADAPTER_PARTS.update(model=model, metadata=metadata)
    files["adapter"] = adapter
    files["adapter_empty"] = case / "empty.safetensors"
    files["adapter_empty"].write_bytes(b"")
    files["adapter_truncated"] = case / "truncated.safetensors"
    files["adapter_truncated"].write_bytes(adapter.read_bytes()[: adapter.stat().st_size * 2 // 3])
    from safetensors.torch import save_file

    files["adapter_foreign"] = case / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(files["adapter_foreign"]), metadata={"format": "pt"})
    files["adapter_version"] = _rewrite_adapter(adapter, case / "version3.safetensors",
                                                edit_metadata=lambda m: m.update(format_version="3"))
    files["adapter_bad_json"] = _rewrite_adapter(adapter, case / "bad_json.safetensors",
                                                 edit_metadata=lambda m: m.update(saltsegment="{not json"))
    files["adapter_other_weights"] = _rewrite_adapter(
        adapter, case / "other_weights.safetensors", edit_values=lambda v: v.update(base_weights_sha256="0" * 64))
    files["adapter_other_model"] = _rewrite_adapter(
        adapter, case / "other_model.safetensors", edit_values=lambda v: v.update(base_model="sam_vit_b"))

    return files


# --------------------------------------------------------------------------- running

@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    out: Path | None
    seconds: float


def _fill(text: str, files: dict[str, Path]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), text)


def _run_case(case: Case, files: dict[str, Path], workdir: Path) -> Outcome:
    workdir.mkdir()
    out = workdir / case.out if case.out else None
    if out is not None:
        out.write_bytes(PREVIOUS)
    args = [_fill(arg, files) for arg in case.args]
    if case.command in ("train", "propagate") and "--out" not in args:
        args += ["--out", str(out)]
    if case.command == "train":
        args += ["--steps", "2", "--batch-size", "1"] if "--steps" not in args else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALTSEGMENT_")}
    env.update(OMP_NUM_THREADS="1", **{k: _fill(v, files) for k, v in case.env.items()})
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "SALTSegmentLib.cli", case.command, *args],
                               capture_output=True, text=True, env=env, timeout=300, cwd=workdir)
    return Outcome(completed.returncode, completed.stdout, completed.stderr, out, time.perf_counter() - start)


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory) -> dict[str, Outcome]:
    """Run every case, two subprocesses at a time (each spends most of its time importing torch)."""
    root = tmp_path_factory.mktemp("bad_input_runs")
    before = {p: p.read_bytes() for p in inputs["case"].iterdir() if p.is_file()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(_run_case, case, inputs, root / f"case{index:02d}")
                   for index, case in enumerate(CASES)}
        results = {name: future.result() for name, future in futures.items()}
    after = {p: p.read_bytes() for p in inputs["case"].iterdir() if p.is_file()}
    assert after == before, "a case changed or created an input file"
    return results


def _check_stderr(stderr: str, case: Case) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if case.exit == 2:  # argparse: usage lines, then "saltsegment train: error: ..."
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1, stderr
        assert re.search(case.message, errors[0]), stderr
        return
    errors = [line for line in lines if line.startswith("error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    others = [line for line in lines if line not in errors + hints]
    assert len(errors) == 1 and len(hints) <= 1, stderr
    assert not [line for line in others if not re.match(r"^(train|propagate):", line)], stderr  # progress bar only
    assert re.search(case.message, errors[0][len("error: "):]), stderr
    if case.hint is not None:
        assert hints and case.hint in hints[0], stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, outcomes, inputs):
    outcome = outcomes[case.id]
    assert outcome.returncode == case.exit, (outcome.returncode, outcome.stderr)
    _check_stderr(outcome.stderr, case)
    if outcome.out is not None:
        assert outcome.out.read_bytes() == PREVIOUS
        assert sorted(p.name for p in outcome.out.parent.iterdir()) == [outcome.out.name]  # no temporary file
    assert not inputs["pickle_marker"].exists(), "a pickled payload was executed"


def test_output_folder_stays_missing(outcomes, inputs):
    assert not (inputs["case"] / "no_such_folder").exists()


def test_debug_shows_the_traceback(inputs, capsys, restore_signals):
    from SALTSegmentLib import cli

    assert cli.main(["--debug", "evaluate", "--pred", str(inputs["labels_moved"]), "--ref", str(inputs["drawn"])]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and "error: Prediction and reference grids differ" in stderr


# --------------------------------------------------------------------------- the cheaper checks, in-process

@pytest.mark.parametrize("argv, message", [
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--steps", "0"], "--steps: expected a positive whole"),
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--learning-rate", "-1"], "expected a positive number"),
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--learning-rate", "nan"], "expected a positive number"),
    (["propagate", "--image", "i", "--adapter", "a", "--out", "o", "--range", "a:b"], "expected FIRST:LAST"),
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--slices", "1,x"], "comma-separated slice numbers"),
    (["propagate", "--image", "i", "--adapter", "a", "--out", "o", "--absent", "52"], "expected NAME=SLICES"),
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--absent", "Thalamus_L=x"],
     "expected whole slice numbers"),
    (["train", "--image", "i", "--labels", "l", "--out", "o", "--absent", "Thalamus_L="], "expected NAME=SLICES"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    from SALTSegmentLib.cli import build_parser

    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--image", "a.nrrd", "--labels", "a.seg.nrrd", "--image", "b.nrrd", "--labels", "b.seg.nrrd",
      "--absent", "Thalamus_L=3"], r"--absent applies to one volume; with several, put each volume's marks in the "
                                   r"'absent' column of --cases"),
    (["train", "--image", "a.nrrd", "--labels", "a.seg.nrrd", "--image", "b.nrrd", "--labels", "b.seg.nrrd",
      "--slices", "3"], r"--slices applies to one volume"),
    (["propagate", "--cases", "{cases}", "--adapter", "x.safetensors", "--absent", "Thalamus_L=3"],
     r"--absent applies to one volume; with --cases, put each volume's marks in the 'absent' column"),
])
def test_options_for_one_volume_are_refused_with_several(argv, message, tmp_path, capsys, restore_signals):
    """Before anything is read: the user is told where each volume's slices and marks go."""
    from SALTSegmentLib import cli

    cases = tmp_path / "cases.csv"
    cases.write_text("image\na.nrrd\n")
    argv = [arg.replace("{cases}", str(cases)) for arg in argv] + ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert re.search(r"error: " + message, capsys.readouterr().err)


@pytest.mark.parametrize("name", ["some_nan", "uint32_huge", "int64_huge"])
def test_unusual_intensities_pass_every_check_before_the_model(name, inputs, tmp_path):
    """NaN/Inf voxels and integer types near their limits: accepted, mapped into [0, 1] without overflow."""
    from SALTSegmentLib import preprocessing as pp
    from SALTSegmentLib.pipeline import TrainJob, run_training
    from SALTSegmentLib.volume_io import read_image

    class Ready(Exception):
        pass

    def ready():
        raise Ready

    job = TrainJob(image=str(inputs[name]), labels=str(inputs["drawn"]), out=str(tmp_path / "a.safetensors"))
    with pytest.raises(Ready):  # every input check passed; the model would load next
        run_training(job, on_ready=ready)
    image, _ = read_image(inputs[name])
    mapped = pp.parse_intensity("auto", image).apply(image)
    assert np.isfinite(mapped).all() and mapped.min() >= 0 and mapped.max() <= 1 and mapped.std() > 0


def test_output_path_checks(tmp_path, monkeypatch):
    from SALTSegmentLib.preflight import check_output_path

    with pytest.raises(IsADirectoryError, match="Output path is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="Output folder does not exist"):
        check_output_path(tmp_path / "missing" / "a.nrrd")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(PermissionError, match="Output folder is not writable") as raised:
        check_output_path(tmp_path / "a.nrrd")
    assert raised.value.hint == "choose an output folder you can write to"


def test_adapter_files_that_are_not_adapters(inputs, tmp_path):
    from SALTSegmentLib.adapter_file import AdapterFileError, load_adapter_metadata

    (tmp_path / "empty.safetensors").write_bytes(b"")
    for path, message in [(tmp_path / "missing.safetensors", "Adapter file not found"),
                          (tmp_path / "empty.safetensors", "too short"),
                          (inputs["adapter_bad_json"], "corrupt adapter metadata")]:
        with pytest.raises(AdapterFileError, match=message) as raised:
            load_adapter_metadata(path)
        assert raised.value.hint
    bad_segments = _rewrite_adapter(inputs["adapter"], tmp_path / "bad_segments.safetensors",
                                    edit_values=lambda v: v.update(segments=[{"name": "x"}]))
    with pytest.raises(AdapterFileError, match="corrupt adapter metadata"):
        load_adapter_metadata(bad_segments)


# --------------------------------------------------------------------------- memory estimate

def test_available_memory_reads_the_override_or_the_system(monkeypatch):
    from SALTSegmentLib.preflight import MEMORY_LIMIT_ENV, MemoryEstimate, available_memory_bytes, check_memory

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2e9")
    assert available_memory_bytes() == 2_000_000_000
    check_memory(MemoryEstimate({"model": 10 ** 9}), "it", "hint")
    with pytest.raises(ValueError, match=r"needs about 2.8 GiB of memory \(volume 1.9 GiB, model 954 MiB\) "
                                         r"but only 1.9 GiB"):
        check_memory(MemoryEstimate({"model": 10 ** 9, "volume": 2 * 10 ** 9}), "it", "hint")
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    available = available_memory_bytes()  # psutil: what is free plus what this process holds, on every system
    assert available is not None and available > 0


# --------------------------------------------------------------------------- disk full, out of memory

@pytest.fixture
def restore_signals():
    """``cli.main`` installs SIGTERM/SIGINT handlers; put pytest's back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _disk_full_writer(real_write):
    def write(*args, **kwargs):
        target = Path(args[1] if len(args) > 1 else kwargs.get("filename"))
        target.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_atomic_writes_leave_nothing_when_the_disk_fills(tmp_path, monkeypatch, inputs):
    from SALTSegmentLib import volume_io
    from SALTSegmentLib.atomic_files import atomic_path

    final = tmp_path / "result.seg.nrrd"
    final.write_bytes(PREVIOUS)
    with pytest.raises(OSError) as raised, atomic_path(final) as temporary:
        temporary.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(final)
    monkeypatch.setattr(volume_io.sitk, "WriteImage", _disk_full_writer(sitk.WriteImage))
    labels, geometry, segments = read_label_map(inputs["drawn"])
    with pytest.raises(OSError) as raised:
        volume_io.write_label_map(final, labels, geometry, segments)
    assert raised.value.errno == errno.ENOSPC
    assert final.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_a_writer_failing_on_a_full_disk_is_reported_as_disk_full(tmp_path, monkeypatch):
    """SimpleITK and safetensors report ENOSPC in their own words; free space tells."""
    from SALTSegmentLib import atomic_files

    monkeypatch.setattr(atomic_files.shutil, "disk_usage", lambda folder: type("U", (), {"free": 4096})())
    with pytest.raises(OSError) as raised, atomic_files.atomic_path(tmp_path / "x.nrrd"):
        raise RuntimeError("ImageFileWriter: could not write file")
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def _one_slice_train_args(inputs, out: Path) -> list[str]:
    return ["train", "--image", str(inputs["image"]), "--labels", str(inputs["drawn"]), "--slices", "2",
            "--out", str(out), "--steps", "1", "--batch-size", "1", "--method", "lora"]


def test_saving_an_adapter_on_a_full_disk_keeps_the_previous_one(inputs, tmp_path, monkeypatch):
    import safetensors.torch

    from SALTSegmentLib.adapter_file import save_adapter
    from SALTSegmentLib.prompts import SegmentPrompts

    out = tmp_path / "adapter.safetensors"
    out.write_bytes(PREVIOUS)
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_writer(safetensors.torch.save_file))
    with pytest.raises(OSError) as raised:
        save_adapter(out, _ADAPTER_PARTS["model"], SegmentPrompts(1), _ADAPTER_PARTS["metadata"])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
    assert out.read_bytes() == PREVIOUS and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_reports_a_full_disk_in_one_line(inputs, tmp_path, monkeypatch, capsys, restore_signals):
    """Propagation (one slice) ends on a full disk: one line, the previous segmentation untouched."""
    from SALTSegmentLib import cli, volume_io

    out = tmp_path / "seg.seg.nrrd"
    out.write_bytes(PREVIOUS)
    monkeypatch.setattr(volume_io.sitk, "WriteImage", _disk_full_writer(sitk.WriteImage))
    assert cli.main(["propagate", "--image", str(inputs["image"]), "--adapter", str(inputs["adapter"]),
                     "--out", str(out), "--range", "3:3"]) == 1
    stderr = capsys.readouterr().err
    assert f"error: disk full while writing {out}" in stderr, stderr
    assert "hint: free disk space" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == PREVIOUS and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_reports_out_of_memory_with_the_setting_to_lower(inputs, tmp_path, monkeypatch, capsys,
                                                              restore_signals):
    from SALTSegmentLib import cli
    from SALTSegmentLib.training import FewShotTrainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)")

    monkeypatch.setattr(FewShotTrainer, "_step_loss", out_of_memory)
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(PREVIOUS)
    assert cli.main(_one_slice_train_args(inputs, out)) == 1
    stderr = capsys.readouterr().err
    assert "error: out of memory on the GPU" in stderr and "hint: lower --batch-size" in stderr, stderr
    assert "Traceback" not in stderr
    assert out.read_bytes() == PREVIOUS and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cpu_allocator_failure_is_out_of_memory():
    from SALTSegmentLib.cli import _hint, _message

    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 123456789 bytes")
    assert _message(error) == "out of memory in main memory"
    assert "--range" in _hint(error, "propagate") and "--batch-size" in _hint(MemoryError(), "train")


def test_adapter_header_check_accepts_real_files(inputs):
    from SALTSegmentLib.adapter_file import read_adapter_metadata

    assert read_adapter_metadata(inputs["adapter"])["base_model"] == "lite_medsam"
    header_length = struct.unpack("<Q", inputs["adapter"].read_bytes()[:8])[0]
    assert header_length < inputs["adapter"].stat().st_size
