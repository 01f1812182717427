"""A Dask worker preload: ``dask worker --preload mgd3_assets.dask_preload`` loads the project's
code (torch, diffusers, Dagster, the definitions module) when the worker process starts.

Without it the first step a worker runs loads all of that inside its stage, about 9 s of CPU
on this project's 2-core machine, while the step itself may need 1.5 s. The local clusters of
``make cluster-demo``, the benchmarks and the tests start their workers with it; add it to your
own workers' command line (README, "Scaling out"). It only imports: the experiment, storage root
and backbone are read when a step runs.
"""

import mgd3_assets.definitions  # noqa: F401
