"""The parts of the training loop that the recipe (`finlora.train`) composes: one batch's
gradients and the optimizer step (`step`), and the validation pass (`validation`)."""
