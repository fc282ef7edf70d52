"""The part of the package that Slicer's own process imports: no torch, no model code.

The Slicer module (``SALTSegment.py``) imports only these modules and
``slicer_bridge``; everything that needs torch runs in the worker process
(``python -m SALTSegmentLib.cli``). ``Testing/test_host_boundary.py`` imports
each module here in an interpreter where ``import torch`` fails, so the
boundary cannot break silently.
"""
