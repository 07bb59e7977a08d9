"""One-off screenings and lever measurements, kept runnable (`python -m bench.research.NAME`); their results
are recorded in docs/research/."""
