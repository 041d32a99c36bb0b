"""Op families: one folder each, reference beside the kernels (see docs/design.md)."""
