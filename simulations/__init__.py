"""Scenarios, the `fedstill` command line and the simulation launcher."""
