"""charrnn: character-level RNN language models on numpy."""

__version__ = "0.1.0"
