"""SALTSegment engine: few-shot SALT adaptation of Segment Anything models for 3D volumes.

The engine never imports slicer or qt; only ``slicer_bridge`` converts MRML nodes.
"""

__version__ = "0.1.0"
