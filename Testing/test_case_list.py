"""Case lists (``train --cases``, ``propagate --cases``): what a line means, and one-line errors naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from SALTSegmentLib.case_list import CaseListError, read_case_list, volume_stem


def _write(folder: Path, text: str) -> Path:
    path = folder / "cases.csv"
    path.write_text(text)
    return path


def test_paths_are_relative_to_the_list_and_slices_and_names_are_read(tmp_path):
    path = _write(tmp_path, "# site A\nimage, labels, slices\n\nct1.nii.gz,ct1_drawn.seg.nrrd,12 30;41\n"
                            "/data/dicom/ct2,,\n")
    first, second = read_case_list(path)
    assert (first.image, first.labels, first.slices, first.name, first.line) == (
        str(tmp_path / "ct1.nii.gz"), str(tmp_path / "ct1_drawn.seg.nrrd"), [12, 30, 41], "ct1", 4)
    assert (second.image, second.labels, second.slices, second.name) == ("/data/dicom/ct2", None, None, "ct2")
    assert first.absent == second.absent == {}


def test_absent_marks_are_read_per_line(tmp_path):
    """``NAME=SLICES`` marks separated by ';', slices by commas (quoted) or spaces; a name may hold spaces or '='."""
    path = _write(tmp_path, 'image,absent\na.nrrd,"Thalamus_L=52,53; Left caudate=18 17"\n'
                            "b.nrrd,\nc.nrrd,a=b=4;a=b=2;\n")
    first, second, third = read_case_list(path)
    assert first.absent == {"Thalamus_L": [52, 53], "Left caudate": [17, 18]}
    assert second.absent == {}
    assert third.absent == {"a=b": [2, 4]}


@pytest.mark.parametrize("text,labels_required,message", [
    ("", False, "lists no volume"),
    ("labels\nx.seg.nrrd\n", False, "must name an 'image' column"),
    ("image,size\na.nrrd,3\n", False, "must name an 'image' column"),
    ("image\na.nrrd\n", True, "training needs a 'labels' column"),
    ("image,labels\na.nrrd,\n", True, "line 2: no labels"),
    ("image,labels\na.nrrd\n", False, "line 2: 1 values for 2 columns"),
    ("image,labels,slices\na.nrrd,b.nrrd,3 x\n", True, "line 2: slices must be whole numbers"),
    ("image\n", False, "lists no volume under its header"),
    ("image,absent\na.nrrd,Thalamus_L=x\n", False, "line 2: absent: expected whole slice numbers"),
    ("image,absent\na.nrrd,52\n", False, "line 2: absent: expected NAME=SLICES"),
    ("image,absent\na.nrrd,Thalamus_L=\n", False, "line 2: absent: expected NAME=SLICES"),
])
def test_a_wrong_list_is_refused_with_the_line(tmp_path, text, labels_required, message):
    with pytest.raises(CaseListError, match=message):
        read_case_list(_write(tmp_path, text), labels_required=labels_required)


def test_a_missing_list_says_so(tmp_path):
    with pytest.raises(CaseListError, match="Case list not found"):
        read_case_list(tmp_path / "nothing.csv")


def test_volume_stem():
    assert [volume_stem(n) for n in ("ct.nii.gz", "a.seg.nrrd", "b.mha", "dicom_folder", ".nrrd")] == \
        ["ct", "a", "b", "dicom_folder", ".nrrd"]
