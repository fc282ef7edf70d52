"""Reading and writing volumes and label maps with SimpleITK.

Arrays are always (z, y, x) numpy arrays, as SimpleITK returns them; the
geometry (spacing, origin, direction, in SimpleITK's LPS convention) travels
beside the array in :class:`VolumeGeometry` so outputs land on exactly the
input's grid. Slicer ``.seg.nrrd`` files keep their segment names and colours,
and a multi-layer one (overlapping segments) is read and written as an array of
shape (layers, z, y, x) (see :mod:`label_layers`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic_files import atomic_path


class VolumeReadError(ValueError):
    """A file or folder could not be read as a 3D volume."""


@dataclass(frozen=True)
class VolumeGeometry:
    """Voxel grid of a volume: size (x, y, z), spacing in mm, origin and direction (LPS)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_image(cls, image: sitk.Image) -> "VolumeGeometry":
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: "VolumeGeometry", tolerance: float = 1e-4) -> list[str]:
        """Names of the properties in which two grids differ (empty when they match)."""
        diffs = []
        if tuple(self.size) != tuple(other.size):
            diffs.append(f"size {self.size} vs {other.size}")
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = 1.0 if name == "direction" else max(1.0, float(np.abs(a).max(initial=0.0)))
            if not np.allclose(a, b, atol=tolerance * scale, rtol=0):
                diffs.append(f"{name} {tuple(round(float(v), 4) for v in a)} vs "
                             f"{tuple(round(float(v), 4) for v in b)}")
        return diffs

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}


@dataclass
class Segment:
    """One labelled structure: its value in the label map, name, display colour (RGB in 0..1) and layer.

    ``layer`` matters only in a multi-layer label map (overlapping segments);
    there no two segments share a value, whatever their layers.
    """

    label: int
    name: str
    color: tuple[float, float, float] = field(default=(0.5, 0.5, 0.5))
    layer: int = 0


# A palette for segments that arrive without colours (plain label maps).
_PALETTE = [
    (0.90, 0.35, 0.30), (0.30, 0.65, 0.90), (0.40, 0.80, 0.40), (0.95, 0.75, 0.25),
    (0.70, 0.45, 0.85), (0.30, 0.85, 0.80), (0.95, 0.55, 0.75), (0.65, 0.55, 0.35),
]


def default_color(label: int) -> tuple[float, float, float]:
    return _PALETTE[(label - 1) % len(_PALETTE)]


def _read_sitk(path: str | os.PathLike) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"File not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            warnings = sitk.ProcessObject_GetGlobalWarningDisplay()
            sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK prints "No Series were found" to stderr
            try:
                series = reader.GetGDCMSeriesIDs(str(path))
            finally:
                sitk.ProcessObject_SetGlobalWarningDisplay(warnings)
            if not series:
                raise VolumeReadError(f"No DICOM series found in folder {path}")
            if len(series) > 1:
                raise VolumeReadError(
                    f"Folder {path} holds {len(series)} DICOM series; put one series per folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.LoadPrivateTagsOn()
        return reader.Execute()
    except VolumeReadError:
        raise
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise VolumeReadError(f"Cannot read {path}: {first_line}") from None


def require_3d_scalar(path: str | os.PathLike, dimension: int, components: int) -> None:
    """Refuse anything but a scalar 3D volume (from an image or from a header alone)."""
    if components != 1:
        raise VolumeReadError(f"{path} has {components} components per voxel; "
                              "a scalar (single-channel) 3D volume is needed")
    if dimension != 3:
        raise VolumeReadError(f"{path} is {dimension}D; a 3D volume is needed")


def _require_3d_scalar(image: sitk.Image, path: str | os.PathLike) -> None:
    require_3d_scalar(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel())


@dataclass(frozen=True)
class VolumeInfo:
    """What a volume file's header says, read without loading any voxel."""

    size: tuple[int, ...]
    components: int
    bytes_per_component: int
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)   # row-major, LPS

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.float64))


def read_volume_info(path: str | os.PathLike) -> VolumeInfo | None:
    """The header of a volume file (size, components, pixel size); ``None`` for DICOM folders.

    Lets the pipeline refuse a volume that would not fit in memory, or the
    wrong number of dimensions, before reading its voxels.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"File not found: {path}")
    if path.is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise VolumeReadError(f"Cannot read {path}: {first_line}") from None
    components = int(reader.GetNumberOfComponents())
    try:
        bytes_per_component = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    except RuntimeError:
        bytes_per_component = 8
    return VolumeInfo(tuple(int(v) for v in reader.GetSize()), components, int(bytes_per_component),
                      tuple(float(v) for v in reader.GetDirection()))


# Detached formats: a text header plus a data file named in it (SimpleITK names it after the header).
_DETACHED_DATA_SUFFIX = {".nhdr": ".raw.gz", ".mhd": ".zraw"}  # with compression, as the writers here use it
_DATA_FILE_FIELDS = (("data file:", ".nhdr"), ("datafile:", ".nhdr"), ("elementdatafile", ".mhd"))


def files_written_for(path: str | os.PathLike) -> list[Path]:
    """Every file writing a volume to ``path`` creates: the path, and the data file of a detached format."""
    path = Path(path)
    for suffix, data_suffix in _DETACHED_DATA_SUFFIX.items():
        if path.name.lower().endswith(suffix):
            return [path, path.with_name(path.name[: -len(suffix)] + data_suffix)]
    return [path]


def files_of_volume(path: str | os.PathLike) -> list[Path]:
    """The files a volume is read from: the path, and the data file its header names (``.nhdr``, ``.mhd``)."""
    path = Path(path)
    files = [path]
    suffix = next((s for s in _DETACHED_DATA_SUFFIX if path.name.lower().endswith(s)), None)
    if suffix is None or not path.is_file():
        return files
    try:
        with open(path, encoding="latin-1") as header:
            lines = [next(header, "") for _ in range(200)]
    except OSError:
        return files
    for line in lines:
        lowered = line.strip().lower()
        for field, field_suffix in _DATA_FILE_FIELDS:
            if field_suffix == suffix and lowered.startswith(field):
                name = line.strip()[len(field):].strip().lstrip("=").strip()
                if name and " " not in name and name.upper() not in ("LOCAL", "LIST"):
                    files.append(path.parent / name)
    return files


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a scalar 3D image (NIfTI, NRRD, MHA, ... or a DICOM series folder) as float32 (z, y, x)."""
    image = _read_sitk(path)
    _require_3d_scalar(image, path)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return array, VolumeGeometry.from_image(image)


def _segments_from_metadata(image: sitk.Image) -> list[Segment]:
    """Slicer ``.seg.nrrd`` header fields ``SegmentN_Name`` / ``_Color`` / ``_LabelValue`` / ``_Layer``."""
    keys = set(image.GetMetaDataKeys())
    segments = []
    index = 0
    while f"Segment{index}_Name" in keys:
        prefix = f"Segment{index}_"
        label = int(image.GetMetaData(prefix + "LabelValue")) if prefix + "LabelValue" in keys else index + 1
        layer = int(image.GetMetaData(prefix + "Layer")) if prefix + "Layer" in keys else index  # as Slicer reads it
        color = default_color(label)
        if prefix + "Color" in keys:
            values = [float(v) for v in image.GetMetaData(prefix + "Color").split()]
            if len(values) == 3:
                color = tuple(values)
        segments.append(Segment(label=label, name=image.GetMetaData(prefix + "Name"), color=color, layer=layer))
        index += 1
    return segments


def _layers_from_image(image: sitk.Image, path: str | os.PathLike,
                       segments: list[Segment]) -> tuple[np.ndarray, list[Segment]]:
    """A multi-layer ``.seg.nrrd`` (one component per layer) as (layers, z, y, x), values unique across layers.

    Slicer numbers each layer's segments on their own (two layers often both
    use value 1); a segment whose value an earlier segment already holds moves
    to a value used nowhere in the file, so that a value names one segment in
    the whole map. Voxels a layer holds under another layer's segment value
    (listed for no segment of their own layer) move to an unused value too:
    they stay out of every segment, and are reported as unlisted.
    """
    count = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 3 or not segments or any(not 0 <= s.layer < count for s in segments):
        require_3d_scalar(path, image.GetDimension(), count)   # not a segmentation with layers: say so
    layers = np.ascontiguousarray(np.moveaxis(sitk.GetArrayFromImage(image), -1, 0))
    _check_label_values(layers, path)
    layers = layers.astype(np.uint16)
    used = set(np.unique(layers).tolist()) | {s.label for s in segments}

    def move(layer: np.ndarray, value: int) -> int:
        free = next(v for v in range(1, 1 << 16) if v not in used)
        layer[layer == value] = free
        used.add(free)
        return free

    renumbered: list[Segment] = []
    for segment in segments:
        taken = {s.label for s in renumbered}
        label = move(layers[segment.layer], segment.label) if segment.label in taken else segment.label
        renumbered.append(Segment(label, segment.name, segment.color, segment.layer))
    labels = {s.label for s in renumbered}
    for index, layer in enumerate(layers):
        own = {s.label for s in renumbered if s.layer == index}
        for value in set(np.unique(layer).tolist()) & labels - own:
            move(layer, value)
    return layers, renumbered


def _check_label_values(array: np.ndarray, path: str | os.PathLike) -> None:
    if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or not np.all(array == np.round(array))):
        raise VolumeReadError(f"{path} holds non-integer values; a label map must hold whole numbers")
    if array.min(initial=0) < 0:
        raise VolumeReadError(f"{path} holds negative labels; labels must be 0 (background) or positive")
    if array.max(initial=0) > np.iinfo(np.uint16).max:
        raise VolumeReadError(f"{path} holds labels above {np.iinfo(np.uint16).max}")


def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, VolumeGeometry, list[Segment]]:
    """Read a label map (0 = background) and its segments.

    Names and colours come from a Slicer ``.seg.nrrd`` header when present;
    plain label maps get ``Segment_<label>`` names for every value found.
    The array is (z, y, x), or (layers, z, y, x) for a Slicer segmentation
    that keeps overlapping segments in several layers (see :mod:`label_layers`).
    """
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        layers, segments = _layers_from_image(image, path, _segments_from_metadata(image))
        return layers, VolumeGeometry.from_image(image), segments
    _require_3d_scalar(image, path)
    array = sitk.GetArrayFromImage(image)
    _check_label_values(array, path)
    array = array.astype(np.uint16)
    segments = [replace(s, layer=0) for s in _segments_from_metadata(image)]
    if not segments:
        segments = [Segment(label=int(v), name=f"Segment_{int(v)}", color=default_color(int(v)))
                    for v in np.unique(array) if v != 0]
    return array, VolumeGeometry.from_image(image), segments


def unlisted_label_values(array: np.ndarray, segments: list[Segment]) -> dict[int, int]:
    """Label values (with their voxel counts) present in ``array`` that no segment lists.

    A Slicer ``.seg.nrrd`` whose header misses a value leaves those voxels
    out of every segment; the user should hear about it. In a multi-layer
    map a value counts as listed only in its segment's layer.
    """
    if np.ndim(array) == 4:
        unlisted: dict[int, int] = {}
        for layer, values in enumerate(array):
            for value, count in unlisted_label_values(values, [s for s in segments if s.layer == layer]).items():
                unlisted[value] = unlisted.get(value, 0) + count
        return unlisted
    listed = {s.label for s in segments}
    counts = np.bincount(np.asarray(array, dtype=np.uint16).ravel())
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0 and int(v) not in listed}


def _image_from_array(array: np.ndarray, geometry: VolumeGeometry, layered: bool = False) -> sitk.Image:
    spatial = array.shape[1:] if layered else array.shape
    if tuple(spatial[::-1]) != tuple(geometry.size):
        raise ValueError(f"Array shape {array.shape} (z, y, x) does not match grid size {geometry.size} (x, y, z)")
    if layered:  # one vector component per layer, as Slicer's storage node reads it
        return geometry.apply_to(sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True))
    return geometry.apply_to(sitk.GetImageFromArray(array))


def _add_slicer_segment_fields(image: sitk.Image, segments: list[Segment]) -> None:
    """Header fields Slicer's segmentation storage node reads (each segment's value and layer)."""
    size = image.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for index, segment in enumerate(segments):
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{segment.label}")
        image.SetMetaData(prefix + "Name", segment.name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", " ".join(f"{c:.6g}" for c in segment.color))
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(segment.label))
        image.SetMetaData(prefix + "Layer", str(segment.layer))
        image.SetMetaData(prefix + "Extent", extent)
        image.SetMetaData(prefix + "Tags", "|")


def write_label_map(path: str | os.PathLike, array: np.ndarray, geometry: VolumeGeometry,
                    segments: list[Segment]) -> Path:
    """Write a label map atomically; ``.seg.nrrd`` files carry the segment names and colours.

    A (layers, z, y, x) array (overlapping segments, each segment's ``layer``
    set) is written as Slicer writes a multi-layer segmentation, and only to
    a ``.seg.nrrd``: other formats hold one label per voxel.
    """
    path = Path(path)
    layered = np.ndim(array) == 4 and array.shape[0] > 1
    if np.ndim(array) == 4 and not layered:
        array = array[0]
    if layered and not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"Overlapping segments need a .seg.nrrd output (layers); cannot write {path.name}")
    image = _image_from_array(np.ascontiguousarray(array, dtype=np.uint16 if array.max(initial=0) > 255 else np.uint8),
                              geometry, layered)
    if path.name.endswith(".seg.nrrd"):
        _add_slicer_segment_fields(image, segments if layered else [replace(s, layer=0) for s in segments])
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
        if layered:
            _mark_layer_axis_as_list(temporary)
    return path


def _mark_layer_axis_as_list(path: Path) -> None:
    """Call the layer axis a ``list`` (SimpleITK writes ``vector``), exactly as Slicer's own files do."""
    data = path.read_bytes()
    end = data.find(b"\n\n")
    header = data[:end].replace(b"\nkinds: vector ", b"\nkinds: list ", 1)
    path.write_bytes(header + data[end:])


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: VolumeGeometry) -> Path:
    """Write a scalar image atomically (format from the extension)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        sitk.WriteImage(_image_from_array(np.ascontiguousarray(array), geometry), str(temporary), useCompression=True)
    return path
