"""Site adaptation on real MR: one adapter from several volumes, continued with ``--init``, reused from one slice.

The volumes are slabs of the embedded sample (Colin27 ch2 T1 with AAL
labels) with their structures drawn on one or two slices, labelled with
different values in different volumes (segments are matched by name). Steps
are few: these tests check what is recorded and refused, not quality (the
leave-one-patient-out bench, ``saltsegment bench site``, measures that).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SALTSegmentLib.adapter_file import load_adapter_metadata
from SALTSegmentLib.host.adapter_metadata import file_sha256
from SALTSegmentLib.pipeline import TrainCase, TrainJob, run_training
from SALTSegmentLib.training import TrainingConfig, TrainingInputError
from SALTSegmentLib.volume_io import Segment, VolumeGeometry, read_label_map, write_label_map
from SALTSegmentLib.worker_protocol import EXIT_OK

CONFIG = TrainingConfig(steps=1, seed=0, copies_per_slice=2, precision="fp32", checkpoint_every=0)
NAMES = {1: "Thalamus_L", 3: "Caudate_L", 5: "Putamen_L"}    # sample label -> name


def _slab(folder: Path, name: str, image: sitk.Image, labels: np.ndarray, first: int, drawn: dict[int, list[int]],
          values: dict[int, int]) -> TrainCase:
    """Slices first..first+7 of the sample; ``drawn``: slab slice -> sample labels drawn there, stored as ``values``."""
    size = list(image.GetSize())
    slab = sitk.RegionOfInterest(image, [size[0], size[1], 8], [0, 0, first])
    sitk.WriteImage(slab, str(folder / f"{name}.nrrd"))
    map_ = np.zeros_like(labels[first:first + 8])
    for index, kept in drawn.items():
        for label in kept:
            map_[index][labels[first + index] == label] = values[label]
    segments = [Segment(values[label], NAMES[label], (0.5, 0.5, 0.5)) for label in sorted(values)]
    write_label_map(folder / f"{name}_drawn.seg.nrrd", map_, VolumeGeometry.from_image(slab), segments)
    return TrainCase(str(folder / f"{name}.nrrd"), str(folder / f"{name}_drawn.seg.nrrd"))


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_image_path, sample_labels_path) -> dict[str, TrainCase]:
    folder = tmp_path_factory.mktemp("site")
    image = sitk.ReadImage(str(sample_image_path))
    labels, _, _ = read_label_map(sample_labels_path)
    return {
        # the thalamus alone, as value 1
        "a": _slab(folder, "a", image, labels, 30, {3: [1]}, {1: 1}),
        # the thalamus as value 2 and the caudate as value 1: matched by name, not value
        "b": _slab(folder, "b", image, labels, 34, {2: [1, 3], 5: [1, 3]}, {1: 2, 3: 1}),
        # the next patient: the caudate again and a new structure, the putamen
        "c": _slab(folder, "c", image, labels, 38, {3: [3, 5]}, {3: 3, 5: 5}),
        # a new patient with one drawn slice
        "d": _slab(folder, "d", image, labels, 28, {4: [1]}, {1: 1}),
    }


@pytest.fixture(scope="module")
def site_adapter(site, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("site_adapter") / "site.safetensors"
    # The first volume's slices given in the job (as an API caller would), the others' in their cases.
    run_training(TrainJob(image=site["a"].image, labels=site["a"].labels, out=str(out), slices=[3],
                          cases=[site["b"]], config=CONFIG))
    return out


def test_several_volumes_train_one_adapter_with_segments_matched_by_name(site, site_adapter):
    metadata = load_adapter_metadata(site_adapter)
    assert [(s.label, s.name) for s in metadata.segment_list] == [(1, "Thalamus_L"), (2, "Caudate_L")]
    assert [case["name"] for case in metadata.cases] == ["a.nrrd", "b.nrrd"]
    assert [case["sha256"] for case in metadata.cases] == [file_sha256(site["a"].image), file_sha256(site["b"].image)]
    assert [case["labelled_slices"] for case in metadata.cases] == [[3], [2, 5]]
    assert [case["segments"] for case in metadata.cases] == [["Thalamus_L"], ["Thalamus_L", "Caudate_L"]]
    # How long each structure was drawn, for one-slice propagation on the next patient: only where drawn twice.
    slice_mm = sitk.ReadImage(site["b"].image).GetSpacing()[2]
    assert metadata.cases[0]["lengths"] == {}
    assert set(metadata.cases[1]["lengths"]) == {"Thalamus_L", "Caudate_L"}
    assert metadata.cases[1]["lengths"]["Caudate_L"]["span_mm"] == pytest.approx(3 * slice_mm, abs=1e-3)
    assert metadata.lineage is None and metadata.generation == 0
    assert metadata.history() == "learned from 2 volumes (a.nrrd, b.nrrd)"


def test_a_case_does_not_teach_absence_of_a_segment_it_does_not_hold(site, lite_medsam, one_thread):
    """Volume a has no caudate label: on its slices the caudate is unknown (no loss term), never a negative."""
    import copy

    from SALTSegmentLib.pipeline import read_labelled_volume
    from SALTSegmentLib import preprocessing as pp
    from SALTSegmentLib.training import FewShotData, FewShotTrainer

    datas = []
    for key in ("a", "b"):
        volume = read_labelled_volume(site[key].image, site[key].labels, False, None)
        datas.append(FewShotData(volume.image, volume.labels, volume.geometry.spacing, volume.segments,
                                 pp.parse_intensity("mr", volume.image), "k", name=key))
    trainer = FewShotTrainer(copy.deepcopy(lite_medsam), datas, replace(CONFIG, method="decoder", copies_per_slice=1))
    bank = trainer.bank
    assert bank.case_index.tolist() == [0, 1, 1]
    assert bank.known.tolist() == [[True, False], [True, True], [True, True]]
    # one slice of a against two of b: each case still gets at least half its fair share of the draws
    share_a = float(bank.weights[0] / bank.weights.sum())
    assert share_a >= 0.25
    generator = __import__("torch").Generator().manual_seed(0)
    for _ in range(50):
        chosen, _ = trainer._choose_segments(bank.present[0], generator, bank.known[0])
        assert 1 not in chosen.tolist()


def test_continuing_an_adapter_keeps_its_lineage_and_adds_cases_and_segments(site, site_adapter, tmp_path,
                                                                           one_thread):
    out = tmp_path / "continued.safetensors"
    run_training(TrainJob(image=site["c"].image, labels=site["c"].labels, out=str(out), init=str(site_adapter),
                          config=CONFIG))
    parent, child = load_adapter_metadata(site_adapter), load_adapter_metadata(out)
    assert (child.base_model, child.method, child.method_config, child.plane) == \
        (parent.base_model, parent.method, parent.method_config, parent.plane)
    assert [s.name for s in child.segment_list] == ["Thalamus_L", "Caudate_L", "Putamen_L"]
    assert child.lineage == {"parent_sha256": file_sha256(site_adapter), "parent_created": parent.created,
                             "generation": 1, "ancestors": [file_sha256(site_adapter)], "cases_added": ["c.nrrd"],
                             "segments_added": ["Putamen_L"]}
    assert child.cases[:2] == parent.cases
    assert child.cases[2]["name"] == "c.nrrd" and child.cases[2]["generation"] == 1
    assert child.history().startswith("learned from 3 volumes (a.nrrd, b.nrrd, c.nrrd); generation 1, continues ")


@pytest.mark.parametrize("change,refusal", [
    ({"config": replace(CONFIG, method="lora")}, "method salt, not lora"),
    ({"model_id": "sam_vit_b"}, "base model lite_medsam, not sam_vit_b"),
    ({"axis": "coronal"}, "along --axis coronal"),
    ({"intensity": "ct"}, "with --intensity ct"),
])
def test_continuing_with_another_model_method_plane_or_intensity_is_refused(site, site_adapter, tmp_path, change,
                                                                              refusal):
    out = tmp_path / "refused.safetensors"
    job = TrainJob(image=site["c"].image, labels=site["c"].labels, out=str(out), init=str(site_adapter), **change)
    with pytest.raises(TrainingInputError, match=f"Cannot continue site.safetensors.*{refusal}"):
        run_training(job)
    assert not out.exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "SALTSegmentLib.cli", *args]


def test_one_drawn_slice_on_a_new_patient_continues_the_site_adapter_and_propagates_from_the_cli(
        site, site_adapter, tmp_path):
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "labels", "slices"], [site["d"].image, site["d"].labels, "4"]])
    continued, seg = tmp_path / "continued.safetensors", tmp_path / "d.seg.nrrd"
    refused = subprocess.run(_cli("train", "--cases", str(cases), "--init", str(site_adapter), "--method", "lora",
                                  "--out", str(continued)), capture_output=True, text=True, timeout=300)
    assert refused.returncode != EXIT_OK and "Cannot continue site.safetensors" in refused.stderr
    trained = subprocess.run(_cli("train", "--cases", str(cases), "--init", str(site_adapter), "--steps", "1",
                                  "--out", str(continued), "--progress", "json"),
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == EXIT_OK, trained.stderr[-2000:]
    assert load_adapter_metadata(continued).lineage["cases_added"] == ["d.nrrd"]
    propagated = subprocess.run(_cli("propagate", "--image", site["d"].image, "--labels", site["d"].labels,
                                     "--adapter", str(continued), "--out", str(seg), "--range", "3:5", "--progress", "json"),
                                capture_output=True, text=True, timeout=600)
    assert propagated.returncode == EXIT_OK, propagated.stderr[-2000:]
    result, _, segments = read_label_map(seg)
    drawn, _, _ = read_label_map(site["d"].labels)
    thalamus = next(s.label for s in segments if s.name == "Thalamus_L")
    assert np.array_equal(result[4] == thalamus, drawn[4] == 1)                 # the drawn slice is kept exactly
    assert sum(bool((result[k] == thalamus).any()) for k in (3, 5)) == 2        # and its neighbours are segmented


def test_case_lists_carry_each_volumes_slices_and_absent_marks_to_train_and_propagate(site, site_adapter, tmp_path):
    """The ``slices`` and ``absent`` columns, per volume: recorded by ``train``, kept empty by ``propagate``."""
    cases = tmp_path / "train.csv"
    with open(cases, "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "labels", "slices", "absent"],
                                      [site["a"].image, site["a"].labels, "3", ""],
                                      [site["b"].image, site["b"].labels, "2 5", "Thalamus_L=0,7; Caudate_L=7"]])
    adapter = tmp_path / "marked.safetensors"
    trained = subprocess.run(_cli("train", "--cases", str(cases), "--steps", "1", "--out", str(adapter),
                                  "--progress", "json"), capture_output=True, text=True, timeout=600)
    assert trained.returncode == EXIT_OK, trained.stderr[-2000:]
    records = load_adapter_metadata(adapter).cases
    assert [case["labelled_slices"] for case in records] == [[3], [2, 5]]
    assert [case["absent"] for case in records] == [{}, {"Thalamus_L": [0, 7], "Caudate_L": [7]}]

    volumes, folder = tmp_path / "propagate.csv", tmp_path / "segs"
    with open(volumes, "w", newline="") as handle:       # the same volume twice: without and with a mark
        csv.writer(handle).writerows([["image", "labels", "name", "absent"],
                                      [site["d"].image, site["d"].labels, "unmarked", ""],
                                      [site["d"].image, site["d"].labels, "marked", "Thalamus_L=6"]])
    propagated = subprocess.run(_cli("propagate", "--cases", str(volumes), "--adapter", str(site_adapter),
                                     "--out", str(folder), "--progress", "json"),
                                capture_output=True, text=True, timeout=600)
    assert propagated.returncode == EXIT_OK, propagated.stderr[-2000:]
    thalamus = {}
    for name in ("unmarked", "marked"):
        result, _, segments = read_label_map(folder / f"{name}.seg.nrrd")
        label = next(s.label for s in segments if s.name == "Thalamus_L")
        thalamus[name] = [bool((result[k] == label).any()) for k in range(result.shape[0])]
    assert thalamus["unmarked"][6]                                   # the walk reaches slice 6 unless told...
    assert not thalamus["marked"][6] and thalamus["marked"][4]       # ...and a mark keeps it empty
    assert thalamus["marked"][:6] == thalamus["unmarked"][:6]        # nothing changes before it
