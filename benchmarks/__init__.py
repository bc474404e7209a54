"""Benchmarks: ours against transformers' DeepseekV3 (serving, training, compiled decode, continuous batching, GRPO,
the distributed engine), MTP speculation, FP8 training, the load-balance study.

Each benchmark is a module run from the repository root: `python -m benchmarks.NAME --help`; `python -m
benchmarks.run` runs the main ones and rebuilds benchmarks/RESULTS.md. They share one harness (benchmarks.harness:
set-up, workers in fresh processes, the RESULTS.md section writer), the compared models (benchmarks.models) and the
measuring tools (benchmarks.measure). Results go to benchmarks/results/*.json and benchmarks/RESULTS.md.
"""
