"""evoprune: genetic-programming search for channel-pruning metrics."""

__version__ = "0.1.0"
