"""fedtrust.simulations."""
