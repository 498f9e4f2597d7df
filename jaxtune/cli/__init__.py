"""The `jaxtune` command line: train, eval, generate, convert, estimate."""
