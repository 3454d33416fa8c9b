"""Speed benchmarks of cfgfast (pytest-benchmark): `pytest benchmarks/ --benchmark-only`."""
