"""attnserve's HTTP service: FastAPI routes over the continuous-batching engine."""

__version__ = "0.1.0"
