"""One-off measurements behind design choices (see README.md here); run as
``python -m scripts.experiments.NAME`` from the repository root."""
