"""decathlon package."""
