"""mSTAR inference microservice: slide I/O, model bundles, backends, pipeline, API and workers.

This package never imports torch or `training`; training depends on it, not the other way round.
"""

__version__ = "0.1.0"
