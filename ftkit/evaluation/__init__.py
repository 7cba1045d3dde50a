"""`ftkit eval`, `ftkit generate` / `solve`: denoise, check, score and report."""
