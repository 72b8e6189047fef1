"""What a run records: the typed results schema, the run folder, the report and its privacy section."""
