"""Benchmarks that need more than the library: the PyTorch twin of the reference (`torch_reference`) and the
side-by-side timing of our train step against it (`compare_torch`). Run from the repository root, e.g.
`python -m benchmarks.compare_torch`."""
