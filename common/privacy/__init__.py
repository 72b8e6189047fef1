"""Formal privacy for institutions: mechanisms (DP-SGD teachers, PATE inside an institution), accounting, budgets."""
