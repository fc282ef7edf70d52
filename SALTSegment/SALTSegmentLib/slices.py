"""Slices of a volume: which axis, which slices hold labels, putting drawn slices back, range checks.

Torch-free (numpy only): the engine, :mod:`~SALTSegmentLib.slicer_bridge`
and the host modules share it, so each of these ideas has one definition.

Axes. Arrays are (z, y, x) = (k, j, i), as SimpleITK returns them. Two kinds
of names select a slice axis:

- a voxel axis, ``k``, ``j`` or ``i``: array axis 0, 1 or 2, whatever the
  volume's orientation;
- an anatomical plane, ``axial``, ``coronal`` or ``sagittal``: resolved from
  the image direction matrix (:func:`resolve_axis`) to the voxel axis whose
  slices lie closest to that plane. On a volume stored sagittally, ``axial``
  is the voxel axis its direction matrix says (usually j), not k.

Inside the engine (take_slice, occupied_slices, ...) an axis is a voxel-axis
key. For backward compatibility the engine still reads ``axial``,
``coronal`` and ``sagittal`` there as the voxel axes k, j and i (what those
names meant before adapter format 2); plane names are resolved at the edges
(the CLI, the pipeline, the Slicer module) before they reach it.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional, Sequence

import numpy as np

from .host.choices import PLANES, VOXEL_AXES  # the names users type, listed once

ARRAY_AXIS_NAMES = ("k", "j", "i")             # array axes 0, 1, 2 of a (z, y, x) = (k, j, i) array
# What a plane name meant as an engine axis before adapter format 2: a voxel axis (right for axial acquisitions).
LEGACY_VOXEL_AXIS = {"axial": "k", "coronal": "j", "sagittal": "i"}
# Engine axis key -> array axis of a (z, y, x) array.
ARRAY_AXES = {**{name: dim for dim, name in enumerate(ARRAY_AXIS_NAMES)},
              **{plane: ARRAY_AXIS_NAMES.index(v) for plane, v in LEGACY_VOXEL_AXIS.items()}}
# The world axis (LPS or RAS: x = left-right, y = back-front, z = down-up) each plane is perpendicular to.
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}


class SliceRangeError(ValueError):
    """A slice range that does not fit the volume."""


# --------------------------------------------------------------------------- axes

def array_axis(axis: str | int) -> int:
    """The array axis (0, 1, 2 of a (z, y, x) array) of an engine axis key (``k``/``j``/``i``, legacy names)."""
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= int(axis) <= 2:
        return int(axis)
    try:
        return ARRAY_AXES[axis]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown slice axis {axis!r}; choose one of {', '.join(VOXEL_AXES)}") from None


def voxel_axis(axis: str | int) -> str:
    """The voxel-axis name (``k``, ``j`` or ``i``) of an engine axis key or array axis."""
    return ARRAY_AXIS_NAMES[array_axis(axis)]


def _direction_columns(direction: Sequence[float] | np.ndarray) -> np.ndarray:
    """|cosines| (3 x 3: world axis x voxel axis i, j, k) of a direction matrix.

    Takes SimpleITK's row-major 9-tuple (:attr:`VolumeGeometry.direction`),
    a 3 x 3 matrix, or a 4 x 4 IJK-to-RAS matrix (spacing included); LPS and
    RAS differ only in signs, which do not matter here.
    """
    matrix = np.asarray(direction, dtype=float)
    matrix = matrix.reshape(3, 3) if matrix.size == 9 else matrix[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0):
        raise ValueError("The direction matrix has a zero column")
    return np.abs(matrix / norms)


def plane_axes(direction: Sequence[float] | np.ndarray) -> dict[str, str]:
    """Each anatomical plane -> the voxel axis (``k``/``j``/``i``) whose slices lie closest to it.

    One voxel axis per plane: of the six pairings, the one whose slice normals
    are best aligned with the plane normals (sum of |cosines|); ties keep the
    usual pairing (axial = k). Plane and voxel axis are thus inverse of each
    other even on oblique volumes.
    """
    cosines = _direction_columns(direction)               # [world axis, i/j/k column]
    best, best_score = None, -1.0
    for columns in itertools.permutations(range(3)):      # the identity (axial = k, ...) comes first
        score = sum(cosines[world, column] for world, column in zip((0, 1, 2), columns))
        if score > best_score + 1e-9:
            best, best_score = columns, score
    # columns[world] is the ijk column (0 = i) perpendicular to the plane whose normal is that world axis.
    return {plane: "ijk"[best[_PLANE_NORMAL[plane]]] for plane in PLANES}


def plane_voxel_axis(plane: str, direction: Sequence[float] | np.ndarray) -> str:
    """The voxel axis (``k``/``j``/``i``) of the anatomical ``plane`` in a volume with this direction matrix."""
    if plane not in PLANES:
        raise ValueError(f"Unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    return plane_axes(direction)[plane]


def voxel_axis_plane(axis: str | int, direction: Sequence[float] | np.ndarray) -> str:
    """The anatomical plane closest to the slices along a voxel axis (inverse of :func:`plane_voxel_axis`)."""
    name = voxel_axis(axis)
    return next(plane for plane, voxel in plane_axes(direction).items() if voxel == name)


def resolve_axis(axis: str, direction: Sequence[float] | np.ndarray) -> tuple[str, str]:
    """(voxel axis, anatomical plane) for a user's ``--axis``: a plane name or ``k``/``j``/``i``.

    A plane is resolved from the direction matrix; a voxel axis is taken as
    it is, and its plane is the one its slices lie closest to.
    """
    if axis in PLANES:
        voxel = plane_voxel_axis(axis, direction)
        return voxel, axis
    if axis in VOXEL_AXES:
        return axis, voxel_axis_plane(axis, direction)
    raise ValueError(f"Unknown axis {axis!r}; choose a plane ({', '.join(PLANES)}) "
                     f"or a voxel axis ({', '.join(VOXEL_AXES)})")


def describe_axis(voxel: str, plane: Optional[str]) -> str:
    """``voxel axis k (axial)``: how messages name a slice axis."""
    return f"voxel axis {voxel_axis(voxel)}" + (f" ({plane})" if plane else "")


def adapter_axis_in(axis: str, plane: Optional[str], direction: Sequence[float] | np.ndarray) -> str:
    """The voxel axis an adapter's slices run along in a volume with this direction matrix.

    An adapter records the plane of its training slices: a new volume is cut
    along that plane, whatever its storage order. An adapter without a plane
    (format 1) runs along its stored voxel axis.
    """
    return plane_voxel_axis(plane, direction) if plane else voxel_axis(axis)


# --------------------------------------------------------------------------- which slices hold labels

def occupied_slices(mask: np.ndarray, axis: str | int) -> list[int]:
    """Indices along ``axis`` of the slices on which a 3D mask (any non-zero voxel) has a voxel.

    A (layers, z, y, x) mask counts a slice where any layer has a voxel.
    """
    dim = array_axis(axis) + np.ndim(mask) - 3
    other = tuple(a for a in range(np.ndim(mask)) if a != dim)
    return [int(i) for i in np.flatnonzero(np.any(np.asarray(mask) != 0, axis=other))]


def labelled_slices(labels: np.ndarray, values: Iterable[int], axis: str | int) -> list[int]:
    """Slices along ``axis`` on which any of the label ``values`` has voxels (the slices the user drew)."""
    return occupied_slices(np.isin(labels, list(values)), axis)


# --------------------------------------------------------------------------- putting drawn slices back

def put_back_slices(target: np.ndarray, source: np.ndarray, slices: Iterable[int], axis: str | int,
                    values: Optional[Iterable[int]] = None) -> np.ndarray:
    """Copy ``slices`` (along ``axis``) of ``source`` into ``target`` in place; returns ``target``.

    Without ``values`` each slice is copied whole. With ``values`` (label
    values) only those labels move: on each slice, ``target`` voxels holding
    one of them are cleared and ``source`` voxels holding one are written, so
    other labels in ``target`` stay.
    """
    dim = array_axis(axis)
    selector: list = [slice(None)] * np.ndim(target)
    chosen = None if values is None else list(values)
    for index in slices:
        selector[dim] = int(index)
        where = tuple(selector)
        if chosen is None:
            target[where] = source[where]
            continue
        plane = target[where]                       # a view: edited in place
        drawn = source[where]
        plane[np.isin(plane, chosen)] = 0
        keep = np.isin(drawn, chosen)
        plane[keep] = drawn[keep]
    return target


# --------------------------------------------------------------------------- slice ranges

def check_slice_range(slice_range: tuple[int, int], count: int, along: str,
                      error: type[Exception] = SliceRangeError) -> list[int]:
    """The slices ``first..last`` (inclusive); ``error`` when they do not fit 0..count-1 (``along``: the axis)."""
    first, last = (int(v) for v in slice_range)
    if not 0 <= first <= last < count:
        raise error(f"Slice range {first}:{last} is outside 0:{count - 1} along {along}")
    return list(range(first, last + 1))
