"""The student of a finished run as a product: loading, evaluation, robustness, export, serving speed."""
