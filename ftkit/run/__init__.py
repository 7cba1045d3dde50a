"""A run directory: its paths, lock, start/resume, manifests, file checks, threads and plots."""
