"""Benchmarks: ``make bench``. Every figure is a ratio against a reference measured in the
same run, because timings on shared 2-core machines drift. Results are written under
bench/results/, never asserted."""
