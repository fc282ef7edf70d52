"""Slicing, intensity mapping and the slice <-> model-input geometry.

The geometry tests use label volumes with known boxes on an anisotropic grid
(0.7 x 0.7 x 3 mm) and check that a mask mapped into the model input and back
lands on the same pixels, along all three axes, for integer and non-integer
scale factors, up- and downsampling, at the input size and at the decoder's
low resolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.preprocessing import IntensityMapping, SliceGeometry, parse_intensity, slice_geometry_for

SPACING_XYZ = (0.7, 0.7, 3.0)  # thin in-plane pixels, thick slices


def label_volume() -> np.ndarray:
    """(z, y, x) = (20, 48, 64) with two boxes of known extent."""
    volume = np.zeros((20, 48, 64), dtype=np.uint8)
    volume[5:12, 10:30, 8:40] = 1
    volume[12:17, 30:42, 44:60] = 2
    return volume


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def centroid(mask) -> np.ndarray:
    """(row, col) centre of mass of a 2D mask or weight map."""
    weights = np.asarray(mask, dtype=np.float64)
    rows, cols = np.indices(weights.shape)
    return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


def round_trip(mask: np.ndarray, geometry: SliceGeometry, output_size: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Mask -> target in the input frame -> logits (+1 inside, -1 outside) -> slice grid, thresholded at 0."""
    target = pp.mask_to_input(mask, geometry, output_size)
    logits = (2.0 * target - 1.0)[None, None]
    back = pp.logits_to_slice(logits, geometry)
    assert back.shape == (1, geometry.rows, geometry.cols)
    return (back[0] > 0).numpy(), target


# --------------------------------------------------------------------------- slicing

@pytest.mark.parametrize("axis, shape, spacing", [
    ("k", (48, 64), (0.7, 0.7)),
    ("j", (20, 64), (3.0, 0.7)),
    ("i", (20, 48), (3.0, 0.7)),
    # The engine still reads the plane names as the voxel axes k, j, i (what they meant before adapter format 2).
    ("axial", (48, 64), (0.7, 0.7)),
    ("coronal", (20, 64), (3.0, 0.7)),
    ("sagittal", (20, 48), (3.0, 0.7)),
])
def test_slices_have_the_right_shape_and_pixel_spacing(axis, shape, spacing):
    volume = np.arange(20 * 48 * 64).reshape(20, 48, 64)
    count = pp.slice_count(volume.shape, axis)
    dim = pp.array_axis(axis)
    assert count == volume.shape[dim] and pp.SLICE_AXES[axis] == dim
    assert pp.take_slice(volume, axis, 3).shape == shape
    assert pp.slice_pixel_spacing((0.7, 0.7, 3.0), axis) == spacing
    assert pp.slice_spacing((0.7, 0.7, 3.0), axis) == (3.0, 0.7, 0.7)[dim]
    # Distinct x and y spacing: the row spacing of coronal/sagittal slices is z, the columns x / y.
    assert pp.slice_pixel_spacing((0.5, 0.6, 2.0), axis) == ((0.6, 0.5), (2.0, 0.5), (2.0, 0.6))[dim]
    copy = np.zeros_like(volume)
    for index in range(count):
        pp.put_slice(copy, axis, index, pp.take_slice(volume, axis, index))
    assert np.array_equal(copy, volume)
    occupied = np.zeros(volume.shape, bool)
    pp.put_slice(occupied, axis, 2, True)
    assert pp.occupied_slices(occupied, axis) == [2]
    with pytest.raises(ValueError, match="i, j, k"):
        pp.array_axis("oblique")


def test_slicing_follows_numpy_zyx_indexing():
    volume = label_volume()
    assert np.array_equal(pp.take_slice(volume, "axial", 7), volume[7])
    assert np.array_equal(pp.take_slice(volume, "coronal", 20), volume[:, 20, :])
    assert np.array_equal(pp.take_slice(volume, "sagittal", 50), volume[:, :, 50])


# --------------------------------------------------------------------------- geometry round trips

def test_resized_shape_keeps_the_physical_aspect_ratio():
    axial = slice_geometry_for((48, 64), pp.slice_pixel_spacing(SPACING_XYZ, "axial"), 256)
    coronal = slice_geometry_for((20, 64), pp.slice_pixel_spacing(SPACING_XYZ, "coronal"), 256)
    sagittal = slice_geometry_for((20, 48), pp.slice_pixel_spacing(SPACING_XYZ, "sagittal"), 256)
    assert axial.resized_shape == (192, 256) and axial.scale == (4.0, 4.0)
    # Coronal: 20 x 3 mm = 60 mm tall, 64 x 0.7 = 44.8 mm wide -> 256 x round(256 * 44.8 / 60) = 191.
    assert coronal.resized_shape == (256, 191)
    assert sagittal.resized_shape == (256, round(256 * 48 * 0.7 / 60))
    for geometry in (axial, coronal, sagittal):
        rows, cols = geometry.resized_shape
        physical = (geometry.rows * geometry.row_spacing) / (geometry.cols * geometry.col_spacing)
        assert abs(rows / cols - physical) * cols < 1.0  # aspect within one input pixel
        assert max(rows, cols) == 256
    # The thick-slice direction is stretched: one 3 mm row covers 12.8 input rows, a 0.7 mm column 2.98.
    assert coronal.scale[0] == pytest.approx(12.8) and coronal.scale[1] == pytest.approx(191 / 64)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("output_size", [None, 64])  # the input frame, the decoder's low-res frame
def test_mask_round_trip_along_each_axis(axis, output_size):
    volume = label_volume()
    spacing = pp.slice_pixel_spacing(SPACING_XYZ, axis)
    exact = axis == "axial"  # integer scale factors (4 at 256, 1 at 64)
    checked = 0
    for index in range(0, pp.slice_count(volume.shape, axis), 3):
        labels = pp.take_slice(volume, axis, index)
        geometry = slice_geometry_for(labels.shape, spacing, 256)
        for label in (1, 2):
            mask = labels == label
            if not mask.any():
                continue
            back, target = round_trip(mask, geometry, output_size)
            # In the input frame the mask sits where the box/point mapping puts it (no half-pixel shift).
            target_centre = centroid(target.numpy()) * (256 / (output_size or 256))
            if output_size:  # a low-res pixel k covers input pixels [4k, 4k + 4): centre at 4k + 1.5
                target_centre += (256 / output_size - 1) / 2
            expected = geometry.points_to_input(centroid(mask)[::-1])[::-1]
            assert np.abs(target_centre - expected).max() < 0.5 * 256 / (output_size or 256)
            if exact:
                assert np.array_equal(back, mask), (axis, index, label)
            else:
                assert dice(back, mask) > 0.95, (axis, index, label, dice(back, mask))
                assert np.abs(centroid(back) - centroid(mask)).max() < 0.5
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("shape, spacing", [
    ((512, 512), (0.8, 0.8)),    # CT slice -> 256: factor 0.5
    ((300, 410), (0.9, 0.75)),   # non-integer downsampling
    ((37, 23), (1.0, 1.3)),      # small slice, large non-integer upsampling
])
def test_mask_round_trip_up_and_downsampling(shape, spacing):
    rows, cols = shape
    geometry = slice_geometry_for(shape, spacing, 256)
    mask = np.zeros(shape, dtype=bool)
    mask[rows // 5: rows // 2 + 1, cols // 4: (3 * cols) // 4] = True
    mask[(2 * rows) // 3: (5 * rows) // 6, cols // 8: cols // 3] = True
    back, _ = round_trip(mask, geometry)
    assert dice(back, mask) > 0.95
    assert np.abs(centroid(back) - centroid(mask)).max() < 0.5
    if geometry.scale == (0.5, 0.5):  # even box edges survive a factor-2 round trip exactly
        even = np.zeros(shape, dtype=bool)
        even[100:240, 64:300] = True
        assert np.array_equal(round_trip(even, geometry)[0], even)


def test_image_round_trip_has_no_half_pixel_shift():
    # A smooth image resized into the input and back (as logits are) is unchanged up to interpolation error.
    rows, cols = np.indices((20, 64))
    image = 0.5 + 0.4 * np.sin(rows / 3.0) * np.cos(cols / 7.0)
    geometry = slice_geometry_for(image.shape, (3.0, 0.7), 256)
    resized = pp.slice_to_input(image, geometry)
    assert resized.shape == (3, 256, 256)
    assert torch.equal(resized[0], resized[1]) and torch.equal(resized[0], resized[2])
    r, c = geometry.resized_shape
    assert torch.all(resized[:, r:, :] == 0) and torch.all(resized[:, :, c:] == 0)  # padding bottom/right
    back = pp.logits_to_slice(resized[:1][None], geometry)[0].numpy()
    assert np.abs(back - image).max() < 0.02
    assert abs((back - image).mean()) < 1e-3


# --------------------------------------------------------------------------- box and point mapping

def test_boxes_map_pixel_centres_at_integer_scale():
    geometry = slice_geometry_for((48, 64), (0.7, 0.7), 256)  # scale 4: pixel i covers input [4i, 4i + 4)
    boxes = np.array([[2, 3, 10, 20], [0, 0, 63, 47]])
    mapped = geometry.boxes_to_input(boxes)
    assert np.allclose(mapped, [[9.5, 13.5, 41.5, 81.5], [1.5, 1.5, 253.5, 189.5]])
    assert np.allclose(geometry.points_to_input(np.array([[10, 20]])), [[41.5, 81.5]])
    same = slice_geometry_for((256, 200), (1.0, 1.0), 256)  # scale 1: identity
    assert np.array_equal(same.boxes_to_input(boxes), boxes.astype(float))


@pytest.mark.parametrize("shape, spacing, pixel", [((37, 23), (1.0, 1.3), (20, 9)), ((20, 64), (3.0, 0.7), (7, 31))])
def test_points_land_on_the_resized_pixel_peak(shape, spacing, pixel):
    # A single bright pixel resized bilinearly becomes a symmetric tent centred where that pixel's centre maps.
    image = np.zeros(shape, dtype=np.float32)
    image[pixel] = 1.0
    geometry = slice_geometry_for(shape, spacing, 256)
    resized = pp.slice_to_input(image, geometry)[0].numpy()
    expected = geometry.points_to_input(np.array(pixel[::-1], dtype=float))[::-1]
    assert np.abs(centroid(resized) - expected).max() < 0.05
    box = geometry.boxes_to_input(np.array([pixel[1], pixel[0], pixel[1], pixel[0]]))[0]
    assert np.allclose(box[:2], expected[::-1]) and np.allclose(box[2:], expected[::-1])


def test_mask_box():
    mask = np.zeros((30, 40), dtype=bool)
    assert pp.mask_box(mask) is None
    mask[5:11, 7:20] = True
    assert np.array_equal(pp.mask_box(mask), [7, 5, 19, 10])
    assert np.array_equal(pp.mask_box(mask, margin=5), [2, 0, 24, 15])  # clipped at the top edge
    mask[25:, 35:] = True
    assert np.array_equal(pp.mask_box(mask, margin=5), [2, 0, 39, 29])  # clipped at the far edges


# --------------------------------------------------------------------------- intensity

def ct_volume(rng) -> np.ndarray:
    volume = rng.uniform(-1000.0, 2000.0, size=(8, 32, 32)).astype(np.float32)
    volume[:, :4] = -1000.0  # air
    return volume


def mr_volume(rng) -> np.ndarray:
    return rng.gamma(2.0, 150.0, size=(8, 32, 32)).astype(np.float32)


def test_auto_picks_the_soft_tissue_window_for_ct():
    rng = np.random.default_rng(0)
    mapping = parse_intensity("auto", ct_volume(rng))
    assert mapping == IntensityMapping(kind="window", level=40.0, width=400.0, preset="soft_tissue")
    assert mapping.value_range(ct_volume(rng)) == (-160.0, 240.0)
    mapped = mapping.apply(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]))
    assert np.allclose(mapped, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert mapped.dtype == np.float32
    assert "soft_tissue" in mapping.describe() and "level 40" in mapping.describe()


def test_auto_picks_percentiles_for_mr():
    rng = np.random.default_rng(1)
    volume = mr_volume(rng)
    mapping = parse_intensity("auto", volume)
    assert mapping.kind == "percentile"
    low, high = mapping.value_range(volume)
    assert low == pytest.approx(np.percentile(volume, 0.5)) and high == pytest.approx(np.percentile(volume, 99.5))
    mapped = mapping.apply(volume)
    assert mapped.min() == 0.0 and mapped.max() == 1.0
    assert 0.003 < (mapped == 0.0).mean() < 0.007 and 0.003 < (mapped == 1.0).mean() < 0.007


def test_real_sample_is_recognised_as_mr(sample_image_path):
    from SALTSegmentLib.volume_io import read_image

    volume, _ = read_image(sample_image_path)
    assert parse_intensity("auto", volume).kind == "percentile"


@pytest.mark.parametrize("spec, expected", [
    ("lung", (-600.0, 1500.0, "lung")),
    (" Bone ", (400.0, 1800.0, "bone")),
    ("ct", (40.0, 400.0, "soft_tissue")),
    ("40,400", (40.0, 400.0, None)),
    ("-600, 1500", (-600.0, 1500.0, None)),
    ("50.5,350", (50.5, 350.0, None)),
])
def test_window_settings_parse(spec, expected):
    mapping = parse_intensity(spec)
    assert (mapping.kind, mapping.level, mapping.width, mapping.preset) == ("window", *expected)
    assert IntensityMapping.from_dict(mapping.to_dict()) == mapping


def test_percentile_settings_parse():
    assert parse_intensity("MR") == IntensityMapping() == parse_intensity("percentile")
    mapping = IntensityMapping(low_percentile=1.0, high_percentile=99.0)
    assert IntensityMapping.from_dict({**mapping.to_dict(), "unknown_future_field": 1}) == mapping


@pytest.mark.parametrize("spec", ["", "foo", "40", "40,0", "40,-5", "a,b", "1,2,3", "soft tissue", "auto"])
def test_bad_intensity_settings_raise(spec):
    with pytest.raises(ValueError):
        parse_intensity(spec)  # "auto" without a volume is an error too


@pytest.mark.parametrize("mapping", [IntensityMapping(), parse_intensity("40,400")])
def test_non_finite_values_map_into_the_unit_interval(mapping):
    volume = mr_volume(np.random.default_rng(2))
    volume[0, 0, :3] = [np.nan, np.inf, -np.inf]
    original = volume.copy()
    mapped = mapping.apply(volume)
    assert np.array_equal(volume, original, equal_nan=True)  # the input is not modified
    assert np.isfinite(mapped).all() and mapped.min() >= 0.0 and mapped.max() <= 1.0
    assert mapped[0, 0, 0] == 0.0 and mapped[0, 0, 1] == 1.0 and mapped[0, 0, 2] == 0.0


def test_constant_and_empty_volumes():
    constant = np.full((4, 8, 8), 7.0, dtype=np.float32)
    mapped = IntensityMapping().apply(constant)
    assert np.isfinite(mapped).all() and mapped.min() >= 0.0 and mapped.max() <= 1.0
    assert np.array_equal(pp.rescale_slice(mapped[0]), mapped[0])
    assert parse_intensity("auto", constant).kind == "percentile"
    with pytest.raises(ValueError, match="no finite"):
        IntensityMapping().apply(np.full((2, 2, 2), np.nan))


def test_rescale_slice_spans_the_unit_interval():
    slice01 = np.array([[0.2, 0.4], [0.6, 0.3]], dtype=np.float32)
    rescaled = pp.rescale_slice(slice01)
    assert rescaled.min() == 0.0 and rescaled.max() == 1.0 and rescaled.dtype == np.float32


# --------------------------------------------------------------------------- properties

@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300),
       row_spacing=st.floats(0.2, 5.0), col_spacing=st.floats(0.2, 5.0),
       input_size=st.sampled_from([256, 512, 1024]))
def test_resized_shape_properties(rows, cols, row_spacing, col_spacing, input_size):
    geometry = SliceGeometry(rows, cols, row_spacing, col_spacing, input_size)
    out_rows, out_cols = geometry.resized_shape
    assert 1 <= out_rows <= input_size and 1 <= out_cols <= input_size
    height, width = rows * row_spacing, cols * col_spacing
    longest = max(height, width)
    assert abs(max(out_rows, out_cols) - input_size) <= 1
    assert abs(out_rows - input_size * height / longest) <= 1.0
    assert abs(out_cols - input_size * width / longest) <= 1.0


_special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0])


@settings(max_examples=150, deadline=None)
@given(volume=hnp.arrays(dtype=st.sampled_from([np.float32, np.float64]),
                         shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
                         elements=st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), _special)),
       window=st.one_of(st.none(), st.tuples(st.floats(-2000, 2000), st.floats(1.0, 4000.0))))
def test_intensity_mapping_is_always_finite_in_the_unit_interval(volume, window):
    mapping = IntensityMapping() if window is None else IntensityMapping(kind="window", level=window[0],
                                                                         width=window[1])
    if window is None and not np.isfinite(volume).any():
        with pytest.raises(ValueError):
            mapping.apply(volume)
        return
    mapped = mapping.apply(volume)
    assert mapped.shape == volume.shape and mapped.dtype == np.float32
    assert np.isfinite(mapped).all()
    assert mapped.min() >= 0.0 and mapped.max() <= 1.0
