"""The real pipeline runner: torch + MPI, interpreting the shared schedule."""
