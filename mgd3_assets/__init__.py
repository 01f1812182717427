"""MGD3 as a Dagster data product: the asset graph over ``mgd3_core``.

One module per Dagster concept: ``partitions`` (classes, methods), ``resources``
(experiment config, storage root, backbone), ``assets/`` (one module per stage),
``checks``, ``automation``, ``jobs``, ``versions`` (code versions), ``metadata``
(thumbnails, lineage tables), ``instance`` (where the persistent instance keeps its
files); ``definitions`` assembles them, ``demo`` runs the whole graph.
"""
