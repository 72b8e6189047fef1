"""Models: the registry of teacher and student architectures, their builders and training loops."""
