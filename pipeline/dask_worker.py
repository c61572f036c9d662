"""What the Dask runner installs on every worker of a cluster before a run's tasks arrive. Kept apart
from pipeline.dask_runner, which imports Beam: unpickling this plugin on a worker must not import Beam,
whose import logs the warnings (the apitools note) the plugin is there to hide."""

from __future__ import annotations

import logging

from distributed import WorkerPlugin

from pipeline import runtime


class WorkerLogging(WorkerPlugin):
    """The worker logs like the stage (runtime.configure_logging): without --verbose, the project's lines
    and other libraries' errors only; the warnings libraries log while they import are dropped."""

    name = "dmms-logging"

    def __init__(self, level: str, verbose: bool):
        self.level, self.verbose = level, verbose

    def setup(self, worker) -> None:
        if not self.verbose:
            runtime.quiet_imports([])
        runtime.configure_logging(self.level, self.verbose)
        if not self.verbose:
            for name in ("distributed", "tornado", "asyncio"):
                logging.getLogger(name).setLevel(logging.ERROR)
