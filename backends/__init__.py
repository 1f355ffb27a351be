"""Built-in source backends, registered through the ``snapshotter.backends`` entry points."""
