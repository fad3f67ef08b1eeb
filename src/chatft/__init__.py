"""chatft: full-parameter fine-tuning of chat models on your own dialogues."""

__version__ = "0.1.0"
