"""Data sets: the registry of tasks, their loaders, the public/private split and partitioning."""
