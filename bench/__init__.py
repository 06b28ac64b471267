"""Benchmarks of the pipeline. Run each as a module from the repository root, e.g.

    python -m bench.throughput --help

so that ``pipeline`` and ``tasks`` import from the checkout without any sys.path edits.
"""
