"""ftkernels benchmark suite (see BENCHMARKS.md): ``pytest benchmarks/`` smoke-runs it, ``--benchmark`` times it."""
