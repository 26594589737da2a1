"""``hizli bench``: the project's benchmarks as suites (recipe, compare, longest, kernels), each writing
records in the schema of ``hizli.bench.results`` (one JSON-lines file per suite)."""
