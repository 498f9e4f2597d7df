"""Training: the loop, its optimizer, metrics and logging."""
