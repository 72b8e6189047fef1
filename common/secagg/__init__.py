"""Secure aggregation of soft labels: the server learns only the sum of the institutions' vectors."""
