"""fedsilo: federated learning of vision models across data silos, over MPI."""

__version__ = "0.1.0"
