"""The worker's JSON-lines protocol: defined in :mod:`SALTSegmentLib.host.worker_protocol` (torch-free).

The engine modules that speak it (cli, progress, demo) import it from here.
"""

from .host.worker_protocol import (EVENTS, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,  # noqa: F401
                                   emit, parse_line)
