"""Self-contained experiments that use the package but are not part of a conversion (each has its own loop
and outputs; run from `benchmarks/`)."""
