"""The jobs behind the commands: fit/test a category, benchmarks, metrics, reports, downloads."""
