"""Developer tools that the library never imports: parity against the reference's fixtures
(parity.py) and the benchmark's internals (benchmark.py; run it as python -m dmd_jax.benchmark).
"""
