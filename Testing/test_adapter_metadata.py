"""Adapter metadata is read and checked from the file header alone, with one clear message for every edit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from SALTSegmentLib.host.adapter_metadata import (FORMAT_NAME, FORMAT_VERSION, PROMPT_KEY, AdapterFileError,
                                                  load_adapter_metadata, read_adapter_metadata)

LAYER = "image_encoder.layers.1.blocks.0.attn.qkv"
TENSORS = {
    "salt": [f"{LAYER}.scale", f"{LAYER}.shift", f"{LAYER}.residual_x", f"{LAYER}.residual_y",
             "image_encoder.neck.1.weight", "mask_decoder.output_upscaling.1.weight"],
    "ssam": [f"{LAYER}.scale", f"{LAYER}.shift", "image_encoder.neck.1.weight"],
    "lora": [f"{LAYER}.lora_a", f"{LAYER}.lora_b", "image_encoder.neck.1.weight"],
    "decoder": ["mask_decoder.iou_token.weight", "mask_decoder.output_upscaling.1.weight"],
    "full": ["image_encoder.patch_embed.seq.0.c.weight", "mask_decoder.iou_token.weight"],
}


def _values(**changes) -> dict:
    values = {"base_model": "lite_medsam", "base_weights_sha256": "7" * 64, "input_size": 256, "method": "salt",
              "method_config": {"attention_rank": 0.99, "lora_rank": 4}, "axis": "k", "plane": "axial",
              "intensity": {"kind": "percentile", "low_percentile": 0.5, "high_percentile": 99.5},
              "segments": [{"label": 1, "name": "Thalamus_L", "color": [0.9, 0.3, 0.3]},
                           {"label": 2, "name": "Caudate_L", "color": [0.3, 0.6, 0.9]}],
              "training": {"steps": 40}, "format_version": FORMAT_VERSION, "package_version": "0.1.0",
              "created": "2026-01-01T00:00:00+00:00"}
    values.update(changes)
    return values


def _adapter(path, values=None, tensors=None, prompts=2, version=FORMAT_VERSION):
    method = (values or _values())["method"]
    arrays = {name: np.zeros(4, np.float32) for name in (TENSORS.get(method, TENSORS["salt"]) if tensors is None
                                                         else tensors)}
    if prompts is not None:
        arrays[PROMPT_KEY] = np.zeros((prompts, 1, 256), np.float32)
    save_file(arrays, str(path), metadata={"format": FORMAT_NAME, "format_version": str(version),
                                           "saltsegment": json.dumps(values or _values())})
    return path


@pytest.mark.parametrize("method", sorted(TENSORS))
def test_every_method_loads_with_its_own_tensors(tmp_path, method):
    config = {} if method in ("decoder", "full") else {"rank": 4}
    path = _adapter(tmp_path / "a.safetensors", _values(method=method, method_config=config))
    metadata = load_adapter_metadata(path)
    assert metadata.method == method and metadata.segment_names == ["Thalamus_L", "Caudate_L"]
    assert read_adapter_metadata(path)["axis"] == "k" and metadata.plane == "axial"


@pytest.mark.parametrize("legacy,voxel", [("axial", "k"), ("coronal", "j"), ("sagittal", "i")])
def test_format_1_files_still_load_with_their_voxel_axis(tmp_path, legacy, voxel):
    """Format 1 stored axial/coronal/sagittal for the voxel axes k/j/i and no plane: read as exactly that."""
    values = _values(axis=legacy, format_version=1)
    del values["plane"]
    path = _adapter(tmp_path / "old.safetensors", values, version=1)
    metadata = load_adapter_metadata(path)
    assert (metadata.axis, metadata.plane, metadata.format_version) == (voxel, None, 1)
    assert read_adapter_metadata(path)["axis"] == voxel


def test_a_newer_format_is_refused_with_the_versions_this_one_reads(tmp_path):
    assert FORMAT_VERSION == 2
    path = _adapter(tmp_path / "new.safetensors", _values(format_version=3), version=3)
    with pytest.raises(AdapterFileError, match="uses adapter format version 3; .* reads versions 1, 2") as raised:
        load_adapter_metadata(path)
    assert "train the adapter again" in raised.value.hint


BAD = {
    "label 70000": (dict(segments=[{"label": 70000, "name": "a", "color": [1, 0, 0]}]), 1,
                    "label 70000, outside 1..65535"),
    "label 0": (dict(segments=[{"label": 0, "name": "a", "color": [1, 0, 0]}]), 1, "label 0, outside"),
    "duplicate labels": (dict(segments=[{"label": 3, "name": "a", "color": [1, 0, 0]},
                                        {"label": 3, "name": "b", "color": [0, 1, 0]}]), 2,
                         "label 3 is used by 2 segments"),
    "duplicate names": (dict(segments=[{"label": 1, "name": "a", "color": [1, 0, 0]},
                                       {"label": 2, "name": "a", "color": [0, 1, 0]}]), 2,
                        "the name 'a' is used by 2 segments"),
    "no name": (dict(segments=[{"label": 1, "name": " ", "color": [1, 0, 0]}]), 1, "segment 1 has no name"),
    "label as text": (dict(segments=[{"label": "1", "name": "a", "color": [1, 0, 0]}]), 1,
                      "no whole-number label"),
    "bad colour": (dict(segments=[{"label": 1, "name": "a", "color": [255, 0, 0]}]), 1,
                   "not three values in 0..1"),
    "no segments": (dict(segments=[]), 0, "no segments"),
    "unknown method": (dict(method="dora"), 2, "unknown method 'dora'"),
    "unknown axis": (dict(axis="oblique"), 2, "unknown axis 'oblique'"),
    "plane name as axis": (dict(axis="axial"), 2, "unknown axis 'axial' (a voxel axis"),   # format 2: i, j, k
    "unknown plane": (dict(plane="oblique"), 2, "unknown plane 'oblique'"),
    "unknown model": (dict(base_model="sam_vit_x"), 2, "unknown base model 'sam_vit_x'"),
    "input size": (dict(input_size=-256), 2, "input size -256"),
    "intensity": (dict(intensity={"kind": "window", "level": 40, "width": 0}), 2, "intensity window"),
    "percentiles": (dict(intensity={"kind": "percentile", "low_percentile": 99, "high_percentile": 1}), 2,
                    "intensity percentiles"),
    "intensity kind": (dict(intensity={"kind": "gamma"}), 2, "unknown intensity mapping 'gamma'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_edited_metadata_is_refused_with_one_message(tmp_path, case):
    changes, prompts, message = BAD[case]
    path = _adapter(tmp_path / "a.safetensors", _values(**changes), prompts=prompts)
    with pytest.raises(AdapterFileError, match="corrupt adapter metadata") as raised:
        load_adapter_metadata(path)
    assert message in str(raised.value)
    assert raised.value.hint


@pytest.mark.parametrize("claimed,actual", [("lora", "salt"), ("salt", "lora"), ("ssam", "salt"),
                                            ("decoder", "lora"), ("full", "ssam")])
def test_a_method_that_does_not_match_its_tensors_is_refused(tmp_path, claimed, actual):
    config = {} if claimed in ("decoder", "full") else {"rank": 4}
    path = _adapter(tmp_path / "a.safetensors", _values(method=claimed, method_config=config),
                    tensors=TENSORS[actual])
    with pytest.raises(AdapterFileError, match=f"the method says {claimed} but the tensors are those of {actual}"):
        load_adapter_metadata(path)


def test_every_problem_is_named_at_once(tmp_path):
    values = _values(axis="oblique", segments=[{"label": 70000, "name": "a", "color": [1, 0, 0]},
                                               {"label": 70000, "name": "a", "color": [1, 0, 0]}])
    path = _adapter(tmp_path / "a.safetensors", values, prompts=3)
    with pytest.raises(AdapterFileError) as raised:
        load_adapter_metadata(path)
    text = str(raised.value)
    for part in ("unknown axis", "label 70000, outside", "the name 'a' is used by 2", "3 learned prompt(s) for 2"):
        assert part in text


def test_decoder_files_hold_only_decoder_tensors(tmp_path):
    path = _adapter(tmp_path / "a.safetensors", _values(method="decoder", method_config={}),
                    tensors=TENSORS["decoder"] + ["image_encoder.neck.1.weight"])
    with pytest.raises(AdapterFileError, match="tensors outside the mask decoder"):
        load_adapter_metadata(path)
    path = _adapter(tmp_path / "b.safetensors", _values(method="decoder", method_config={"rank": 4}))
    with pytest.raises(AdapterFileError, match="takes no options"):
        load_adapter_metadata(path)


def test_missing_prompts_and_foreign_files(tmp_path):
    with pytest.raises(AdapterFileError, match="no prompts.tokens tensor"):
        load_adapter_metadata(_adapter(tmp_path / "a.safetensors", prompts=None))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": np.zeros(2, np.float32)}, str(foreign))
    with pytest.raises(AdapterFileError, match="not a SALTSegment adapter"):
        read_adapter_metadata(foreign)
    with pytest.raises(AdapterFileError, match="is a folder"):
        read_adapter_metadata(tmp_path)
