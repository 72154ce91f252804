"""Benchmarks of pyro_diffusion against plain PyTorch; run ``python -m benchmarks.run`` (see
docs/benchmarks.md)."""
