"""MRML bridge: volume and segmentation nodes <-> numpy arrays and engine files.

The only engine file that imports ``slicer`` and ``vtk``; it works in the
Slicer application and in plain CPython with the ``slicer-core`` wheel.

Conventions:

- Arrays are (z, y, x) = (k, j, i), the order SimpleITK and the engine use.
- ``ijk_to_ras`` is a 4x4 numpy matrix in Slicer's RAS world;
  :class:`~SALTSegmentLib.volume_io.VolumeGeometry` is in SimpleITK's LPS
  world. The two differ by flipping the sign of the first two rows.
- Nodes under a parent transform are refused with a message that says how
  to harden the transform: silently resampling would put the results on a
  grid the user does not see, and hardening changes the user's data, which
  only the user should decide.
- Results are written on the segmentation's own grid (the one the Segment
  Editor draws on), so the voxels a user drew are never resampled, and each
  segment keeps every slice of its current mask that holds drawing, and
  stays empty on every slice the user emptied after an earlier prediction
  (see :mod:`~SALTSegmentLib.host.drawn_slices`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .host.drawn_slices import (RECORD_TAG, PredictionRecord, absent_slices, drawn_slices, grid_key,
                                record_prediction)
from .label_layers import segment_mask as label_map_segment_mask, spatial_shape, stack_in_layers
from .slices import (adapter_axis_in, array_axis, occupied_slices, put_back_slices, resolve_axis, voxel_axis,
                     voxel_axis_plane)
from .volume_io import Segment, VolumeGeometry, read_label_map, write_image, write_label_map

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class BridgeError(ValueError):
    """A node cannot be converted; the message says what the user can do."""


def ensure_converter_rules() -> None:
    """Register the segmentation representation converters when nobody has.

    The Slicer application registers them at start-up; plain CPython with
    ``slicer-core`` starts with none, and segmentation nodes then cannot make
    closed surfaces (3D display) from the labelmaps.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())


def check_no_transform(node) -> None:
    """Raise :class:`BridgeError` when ``node`` is under a (linear or non-linear) transform."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return
    kind = "linear" if transform.IsTransformToWorldLinear() else "non-linear"
    raise BridgeError(
        f"'{node.GetName()}' is under the {kind} transform '{transform.GetName()}'. "
        "Harden the transform first (Data module: right-click the node, 'Harden transform') "
        "or remove it, then try again.")


# --- geometry ---------------------------------------------------------------------------

def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def ijk_to_ras_from_geometry(geometry: VolumeGeometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an LPS :class:`VolumeGeometry`."""
    ijk_to_lps = np.eye(4)
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    ijk_to_lps[:3, :3] = direction @ np.diag(geometry.spacing)
    ijk_to_lps[:3, 3] = geometry.origin
    return _RAS_FROM_LPS @ ijk_to_lps


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size: Sequence[int]) -> VolumeGeometry:
    """LPS :class:`VolumeGeometry` of a grid given by its IJK-to-RAS matrix and size (x, y, z)."""
    ijk_to_lps = _RAS_FROM_LPS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise BridgeError("The volume has a zero spacing along one axis")
    direction = ijk_to_lps[:3, :3] / spacing
    return VolumeGeometry(size=tuple(int(v) for v in size),
                          spacing=tuple(float(v) for v in spacing),
                          origin=tuple(float(v) for v in ijk_to_lps[:3, 3]),
                          direction=tuple(float(v) for v in direction.ravel()))


def volume_array_axis(volume_node, axis: str) -> int:
    """Array axis (0 = k, 1 = j, 2 = i) of ``axis`` in a volume: a plane resolved from its direction matrix, or k/j/i.

    The engine's :func:`~SALTSegmentLib.slices.resolve_axis` decides, so the
    panel and the CLI cut the same slices.
    """
    return array_axis(resolve_axis(axis, volume_ijk_to_ras(volume_node))[0])


def adapter_array_axis(volume_node, axis: str, plane: str | None) -> int:
    """Array axis an adapter's slices run along in this volume: its plane, or its voxel axis when it has none."""
    return array_axis(adapter_axis_in(axis, plane, volume_ijk_to_ras(volume_node)))


def describe_array_axis(volume_node, axis: int) -> str:
    """``voxel axis k, the axial plane of this volume``: array ``axis`` said in the volume's terms."""
    plane = voxel_axis_plane(axis, volume_ijk_to_ras(volume_node))
    return f"voxel axis {voxel_axis(axis)}, the {plane} plane of this volume"


def matching_axis(ijk_to_ras: np.ndarray, axis: int, other_ijk_to_ras: np.ndarray) -> int:
    """The array axis of the grid ``other_ijk_to_ras`` whose slices are closest to array ``axis`` of the first grid."""
    normal = np.asarray(ijk_to_ras, dtype=float)[:3, 2 - axis]
    columns = np.asarray(other_ijk_to_ras, dtype=float)[:3, :3]
    cosines = np.abs(normal @ columns) / (np.linalg.norm(columns, axis=0) * np.linalg.norm(normal))
    return 2 - int(np.argmax(cosines))


# --- volumes ----------------------------------------------------------------------------

def volume_ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def volume_to_array(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (z, y, x) (a copy) and the 4x4 IJK-to-RAS matrix of a scalar volume node."""
    check_no_transform(volume_node)
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise BridgeError(f"Volume '{volume_node.GetName()}' holds no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise BridgeError(f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                          "components per voxel; a scalar volume is needed")
    nx, ny, nz = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()
    return array, volume_ijk_to_ras(volume_node)


def volume_geometry(volume_node) -> VolumeGeometry:
    check_no_transform(volume_node)
    return geometry_from_ijk_to_ras(volume_ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions())


def update_volume_from_array(volume_node, array: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Fill a volume node with a (z, y, x) array on the grid ``ijk_to_ras``."""
    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    volume_node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras))
    volume_node.SetAndObserveImageData(image)


def _oriented_image(array: np.ndarray, ijk_to_ras: np.ndarray):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(array, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return image


# --- segmentations ----------------------------------------------------------------------

def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def find_segment_id(segmentation_node, name: str) -> str | None:
    """ID of the first segment called ``name`` (names are what the adapter knows segments by)."""
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segment_ids(segmentation_node):
        if segmentation.GetSegment(segment_id).GetName() == name:
            return segment_id
    return None


def segment_mask(segmentation_node, segment_id: str, shape: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """Binary mask (z, y, x) of one segment resampled (nearest) onto the grid ``ijk_to_ras``."""
    # This is the segment's whole labelmap layer, which it may share with
    # other segments: the segment is the voxels holding its label value.
    source = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, source)
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    if source.GetPointData().GetScalars() is None or source.IsEmpty():
        return np.zeros(tuple(shape), dtype=np.uint8)
    matrix = vtk.vtkMatrix4x4()
    source.GetImageToWorldMatrix(matrix)
    if np.allclose(_matrix_to_numpy(matrix), ijk_to_ras, atol=1e-6):
        return _array_on_extent(source, shape, label_value)  # same grid: no resampling (the common case)
    reference = _oriented_image(np.zeros(tuple(shape), np.uint8), ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        source, reference, resampled, False)
    # The resampled image covers the reference extent only where the segment has voxels.
    return _array_on_extent(resampled, shape, label_value)


@dataclass
class LabelMapExport:
    """Selected segments as one label map on a volume's grid; label i+1 is ``segment_ids[i]``."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    segments: list[Segment]
    segment_ids: list[str]

    @property
    def geometry(self) -> VolumeGeometry:
        return geometry_from_ijk_to_ras(self.ijk_to_ras, spatial_shape(self.array)[::-1])


def segmentation_to_label_map(segmentation_node, reference_volume_node,
                              selected_ids: Iterable[str] | None = None,
                              drawn_only_axis: int | None = None,
                              overlaps_as_layers: bool = False) -> LabelMapExport:
    """Label map (z, y, x) of the selected segments on the reference volume's grid.

    Labels are 1..N in the order of ``selected_ids`` (all segments when None);
    where segments overlap, the later one wins, or, with ``overlaps_as_layers``,
    the map is (layers, z, y, x) as Slicer saves it (see :mod:`label_layers`)
    and each segment keeps its voxels. The segmentation's own geometry may
    differ from the volume's: each segment is resampled. With
    ``drawn_only_axis``, each segment keeps only its slices along that array
    axis that hold drawing (an earlier prediction left untouched is not a label).
    """
    check_no_transform(segmentation_node)
    check_no_transform(reference_volume_node)
    ids = list(segment_ids(segmentation_node) if selected_ids is None else selected_ids)
    ijk_to_ras = volume_ijk_to_ras(reference_volume_node)
    nx, ny, nz = reference_volume_node.GetImageData().GetDimensions()
    shape = (nz, ny, nx)
    segments = []
    segmentation = segmentation_node.GetSegmentation()
    for label, segment_id in enumerate(ids, start=1):
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise BridgeError(f"Segment '{segment_id}' is not in '{segmentation_node.GetName()}'")
        segments.append(Segment(label=label, name=segment.GetName(), color=tuple(segment.GetColor())))

    def masks() -> Iterator[np.ndarray]:
        for segment_id in ids:
            if drawn_only_axis is None:
                yield segment_mask(segmentation_node, segment_id, shape, ijk_to_ras) != 0
            else:
                mask, drawn = segment_drawn_slices(segmentation_node, segment_id, shape, ijk_to_ras, drawn_only_axis)
                yield put_back_slices(np.zeros_like(mask), mask, drawn, drawn_only_axis) != 0

    if overlaps_as_layers:
        array, segments = stack_in_layers(masks(), segments, shape)
    else:
        array = np.zeros(shape, dtype=np.uint16)
        for mask, segment in zip(masks(), segments):
            array[mask] = segment.label
    return LabelMapExport(array, ijk_to_ras, segments, ids)


def segmentation_grid(segmentation_node, reference_volume_node) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (z, y, x) and IJK-to-RAS of the grid the segmentation is edited on.

    That is the segmentation's reference image geometry (set when the Segment
    Editor first drew into it), else the reference volume's grid.
    """
    nx, ny, nz = reference_volume_node.GetImageData().GetDimensions()
    return _grid_of(segmentation_node.GetSegmentation(), (nz, ny, nx), volume_ijk_to_ras(reference_volume_node))


def resample_mask(mask: np.ndarray, ijk_to_ras: np.ndarray, shape: Sequence[int],
                  target_ijk_to_ras: np.ndarray) -> np.ndarray:
    """A binary mask on one grid resampled (nearest neighbour) onto another; a copy when the grids match."""
    if tuple(mask.shape) == tuple(shape) and np.allclose(ijk_to_ras, target_ijk_to_ras, atol=1e-6):
        return (np.asarray(mask) != 0).astype(np.uint8)
    source = _oriented_image((np.asarray(mask) != 0).astype(np.uint8), ijk_to_ras)
    reference = _oriented_image(np.zeros(tuple(shape), np.uint8), target_ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        source, reference, resampled, False)
    return _array_on_extent(resampled, shape)


def _array_on_extent(image, shape: Sequence[int], value: int | None = None) -> np.ndarray:
    """Where ``image`` is non-zero (or equals ``value``) inside extent 0..shape-1; 0 where it does not reach."""
    result = np.zeros(tuple(shape), dtype=np.uint8)
    extent = image.GetExtent()
    if extent[1] < extent[0] or image.GetPointData().GetScalars() is None:
        return result
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    k0, j0, i0 = max(extent[4], 0), max(extent[2], 0), max(extent[0], 0)
    k1, j1, i1 = min(extent[5] + 1, shape[0]), min(extent[3] + 1, shape[1]), min(extent[1] + 1, shape[2])
    if k1 > k0 and j1 > j0 and i1 > i0:
        block = values[k0 - extent[4]:k1 - extent[4], j0 - extent[2]:j1 - extent[2], i0 - extent[0]:i1 - extent[0]]
        result[k0:k1, j0:j1, i0:i1] = block != 0 if value is None else block == value
    return result


def prediction_record(segmentation_node, segment_id: str) -> PredictionRecord | None:
    """What the last import wrote into a segment (None when it never wrote there)."""
    value = vtk.reference("")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None or not segment.GetTag(RECORD_TAG, value):
        return None
    return PredictionRecord.from_json(str(value))


def segment_drawn_slices(segmentation_node, segment_id: str, shape: Sequence[int], ijk_to_ras: np.ndarray,
                         axis: int) -> tuple[np.ndarray, list[int]]:
    """A segment's current mask on a grid, and the slices along ``axis`` that hold drawing."""
    mask = segment_mask(segmentation_node, segment_id, shape, ijk_to_ras)
    return mask, drawn_slices(mask, axis, prediction_record(segmentation_node, segment_id), grid_key(shape, ijk_to_ras))


def segment_absent_slices(segmentation_node, segment_id: str, shape: Sequence[int], ijk_to_ras: np.ndarray,
                          axis: int) -> list[int]:
    """The slices along ``axis`` of a grid that the user emptied after a prediction (the segment is absent there)."""
    mask = segment_mask(segmentation_node, segment_id, shape, ijk_to_ras)
    return absent_slices(mask, axis, prediction_record(segmentation_node, segment_id), grid_key(shape, ijk_to_ras))


def import_label_map(segmentation_node, label_map: np.ndarray, ijk_to_ras: np.ndarray,
                     segments: Sequence[Segment], *, replace: bool = True, axis: int = 0,
                     slice_range: tuple[int, int] | None = None, mark_predicted: bool = False) -> list[str]:
    """Write label map values into segments; return the segment IDs written, in ``segments`` order.

    With ``replace``, a segment whose name already exists is replaced, except
    on every slice (along array ``axis`` of ``label_map``) that holds drawing
    in its current mask, and outside ``slice_range`` (inclusive): there it
    keeps its voxels exactly. It also stays empty on every slice the user
    emptied after an earlier prediction (whatever ``label_map`` holds there),
    and the new record lists those slices again, so the correction outlives
    any number of imports. Otherwise a new segment is added. The writing
    happens on the segmentation's own grid, so kept voxels are never
    resampled. Other segments are never modified (overlaps go to a separate
    labelmap layer). All changes happen inside one StartModify/EndModify
    block so views update once. ``mark_predicted`` records the slices written
    as predictions (a later import may replace them while they stay untouched).
    """
    check_no_transform(segmentation_node)
    ensure_converter_rules()  # without them a segmentation cannot even create an empty segment
    label_map = np.asarray(label_map)
    segmentation = segmentation_node.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    converter = slicer.vtkSegmentationConverter
    if not segmentation.GetConversionParameter(converter.GetReferenceImageGeometryParameterName()) \
            or segmentation.GetNumberOfSegments() == 0:
        # A segmentation without a grid takes the grid of what is imported, so that
        # later edits in the Segment Editor happen at the volume's resolution.
        segmentation.SetConversionParameter(
            converter.GetReferenceImageGeometryParameterName(),
            converter.SerializeImageGeometry(_oriented_image(np.zeros(spatial_shape(label_map), np.uint8), ijk_to_ras)))
    shape, grid_matrix = _grid_of(segmentation, spatial_shape(label_map), ijk_to_ras)
    grid_axis = matching_axis(ijk_to_ras, axis, grid_matrix)
    key = grid_key(shape, grid_matrix)
    outside = None
    if slice_range is not None:
        inside = np.zeros(spatial_shape(label_map), np.uint8)
        index = [slice(None)] * 3
        index[axis] = slice(int(slice_range[0]), int(slice_range[1]) + 1)
        inside[tuple(index)] = 1
        outside = resample_mask(1 - inside, ijk_to_ras, shape, grid_matrix) != 0
    written = []
    modifying = segmentation_node.StartModify()
    try:
        for segment in segments:
            mask = resample_mask(label_map_segment_mask(label_map, segment), ijk_to_ras, shape, grid_matrix)
            segment_id = find_segment_id(segmentation_node, segment.name) if replace else None
            predicted_slices, absent = range(shape[grid_axis]), []
            if segment_id is None:
                segment_id = segmentation.AddEmptySegment("", segment.name, list(segment.color))
            else:
                current, drawn = segment_drawn_slices(segmentation_node, segment_id, shape, grid_matrix, grid_axis)
                absent = absent_slices(current, grid_axis, prediction_record(segmentation_node, segment_id), key)
                put_back_slices(mask, current, drawn + absent, grid_axis)  # absent slices are empty in ``current``
                kept = set(drawn) | set(absent)
                if outside is not None:
                    mask = np.where(outside, current, mask).astype(np.uint8)
                    kept.update(occupied_slices(outside, grid_axis))
                predicted_slices = [i for i in range(shape[grid_axis]) if i not in kept]
            image = _oriented_image(mask, grid_matrix)
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id,
                                                    logic.MODE_REPLACE, image.GetExtent()):
                raise BridgeError(f"Could not write segment '{segment.name}'")
            if mark_predicted:
                record = record_prediction(mask, grid_axis, predicted_slices, key, absent=absent)
                segmentation.GetSegment(segment_id).SetTag(RECORD_TAG, record.to_json())
            written.append(segment_id)
    finally:
        segmentation_node.EndModify(modifying)
    return written


def _grid_of(segmentation, fallback_shape, fallback_ijk_to_ras) -> tuple[tuple[int, int, int], np.ndarray]:
    """The segmentation's reference image geometry as (shape, IJK-to-RAS of voxel 0), else the fallback."""
    converter = slicer.vtkSegmentationConverter
    text = segmentation.GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    geometry = slicer.vtkOrientedImageData()
    if text and converter.DeserializeImageGeometry(text, geometry) and not geometry.IsEmpty():
        extent = geometry.GetExtent()
        matrix = vtk.vtkMatrix4x4()
        geometry.GetImageToWorldMatrix(matrix)
        shift = np.eye(4)
        shift[:3, 3] = (extent[0], extent[2], extent[4])
        return ((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1),
                _matrix_to_numpy(matrix) @ shift)
    return tuple(int(v) for v in fallback_shape), np.asarray(fallback_ijk_to_ras, dtype=float)


# --- files for the worker ---------------------------------------------------------------

def export_volume_file(volume_node, path: str | os.PathLike) -> VolumeGeometry:
    """Write the volume to an image file the CLI reads; return its LPS geometry."""
    array, ijk_to_ras = volume_to_array(volume_node)
    geometry = geometry_from_ijk_to_ras(ijk_to_ras, array.shape[::-1])
    write_image(path, array, geometry)
    return geometry


def export_label_map_file(segmentation_node, reference_volume_node, selected_ids: Iterable[str] | None,
                          path: str | os.PathLike, drawn_only_axis: int | None = None) -> LabelMapExport:
    """Write the selected segments as a ``.seg.nrrd`` (names, colours, overlaps in layers) on the volume's grid."""
    exported = segmentation_to_label_map(segmentation_node, reference_volume_node, selected_ids, drawn_only_axis,
                                         overlaps_as_layers=str(path).endswith(".seg.nrrd"))
    write_label_map(path, exported.array, exported.geometry, exported.segments)
    return exported


def import_label_map_file(path: str | os.PathLike, segmentation_node, reference_volume_node, *,
                          replace: bool = True, axis: int = 0,
                          slice_range: tuple[int, int] | None = None) -> list[str]:
    """Read a label map the CLI predicted and put it into the segmentation (see :func:`import_label_map`).

    The file must lie on the reference volume's grid (the CLI writes its
    output on the input image's grid).
    """
    array, geometry, segments = read_label_map(path)
    expected = volume_geometry(reference_volume_node)
    differences = expected.differences(geometry)
    if differences:
        raise BridgeError(f"{os.path.basename(str(path))} is not on the grid of "
                          f"'{reference_volume_node.GetName()}': " + "; ".join(differences))
    return import_label_map(segmentation_node, array, volume_ijk_to_ras(reference_volume_node), segments,
                            replace=replace, axis=axis, slice_range=slice_range, mark_predicted=True)


def drawn_slice_indices(segmentation_node, reference_volume_node, selected_ids: Iterable[str], axis: int
                        ) -> list[int]:
    """Slices (along array ``axis`` of the volume) on which any selected segment holds drawing."""
    nx, ny, nz = reference_volume_node.GetImageData().GetDimensions()
    ijk_to_ras = volume_ijk_to_ras(reference_volume_node)
    found: set[int] = set()
    for segment_id in selected_ids:
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is not None:
            found.update(segment_drawn_slices(segmentation_node, segment_id, (nz, ny, nx), ijk_to_ras, axis)[1])
    return sorted(found)


def absent_slices_by_name(segmentation_node, reference_volume_node, selected_ids: Iterable[str], axis: int
                          ) -> dict[str, list[int]]:
    """Segment name -> the slices (along array ``axis`` of the volume) the user emptied after a prediction.

    Only segments with such slices are listed, in ``selected_ids`` order;
    the slices are on the volume's grid, as in the label map exported for
    the worker. A name held by two segments keeps the first listed one's
    slices (the worker knows segments by name only).
    """
    nx, ny, nz = reference_volume_node.GetImageData().GetDimensions()
    ijk_to_ras = volume_ijk_to_ras(reference_volume_node)
    segmentation = segmentation_node.GetSegmentation()
    found: dict[str, list[int]] = {}
    seen: set[str] = set()
    for segment_id in selected_ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None or segment.GetName() in seen:
            continue
        seen.add(segment.GetName())
        slices = segment_absent_slices(segmentation_node, segment_id, (nz, ny, nx), ijk_to_ras, axis)
        if slices:
            found[segment.GetName()] = slices
    return found


# --- undo and the panel's parameters -----------------------------------------------------

class UndoPoint:
    """The state of a whole segmentation before an import, restorable in one step.

    Independent of the Segment Editor (whose Undo covers only the
    segmentation it shows): restoring brings back every segment as it was,
    removes the segments the import added, and drops edits made since.
    """

    def __init__(self, segmentation_node) -> None:
        self.segmentation_node = segmentation_node
        self._history = slicer.vtkSegmentationHistory()
        self._history.SetMaximumNumberOfStates(2)  # restoring first saves the current state (for a redo)
        self._history.SetSegmentation(segmentation_node.GetSegmentation())
        if not self._history.SaveState():
            raise BridgeError(f"Could not save the state of '{segmentation_node.GetName()}' for undo")

    def restore(self) -> bool:
        """Put the segmentation back as it was; False when that is no longer possible."""
        if not self._history.IsRestorePreviousStateAvailable():
            return False
        modifying = self.segmentation_node.StartModify()
        try:
            restored = self._history.RestorePreviousState()
        finally:
            self.segmentation_node.EndModify(modifying)
        self._history.RemoveAllStates()
        return bool(restored)


def write_parameters(parameter_node, values: dict[str, str], references: dict[str, object] | None = None) -> None:
    """Store text parameters (and node references, role -> node or None) in a scripted module node."""
    modifying = parameter_node.StartModify()
    try:
        for name, value in values.items():
            parameter_node.SetParameter(name, str(value))
        for role, node in (references or {}).items():
            parameter_node.SetNodeReferenceID(role, node.GetID() if node is not None else None)
    finally:
        parameter_node.EndModify(modifying)


def read_parameters(parameter_node, roles: Iterable[str] = ()) -> tuple[dict[str, str], dict[str, object]]:
    """The text parameters and the referenced nodes (role -> node or None) of a scripted module node."""
    values = {name: parameter_node.GetParameter(name) for name in parameter_node.GetParameterNames()}
    return values, {role: parameter_node.GetNodeReference(role) for role in roles}
