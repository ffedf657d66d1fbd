"""SparseML-compatible import paths (``sparseml.pytorch.*``) re-exporting this package."""
