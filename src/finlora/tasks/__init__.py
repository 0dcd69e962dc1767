"""Task types: how examples become model inputs and targets."""
