"""The benchmark lab: scripts run as modules from the repository root (`python -m bench.run_bench`),
the library they share in bench.harness, one-off screenings in bench.research."""
