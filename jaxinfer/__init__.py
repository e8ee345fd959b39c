"""jaxinfer: JAX/XLA-compiled LLM inference runtime."""

__version__ = "0.1.0"
