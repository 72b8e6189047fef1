"""Deployment tooling: TLS and node keys, an institution's pre-join checks, site data, a local federation."""
