"""Benchmarks: serving (decode/prefill vs transformers' DeepseekV3), training throughput, MTP speculation speedup.

Run everything with `python -m benchmarks.run` (CPU) or `python -m benchmarks.run --device cuda`; each benchmark also
runs on its own (`python -m benchmarks.serving --help`, ...). Results go to benchmarks/results/*.json and
benchmarks/RESULTS.md.
"""
