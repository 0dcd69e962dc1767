"""finlora: offline parameter-efficient fine-tuning of open language models for financial text."""

__version__ = "0.1.0"
