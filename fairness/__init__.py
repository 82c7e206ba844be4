"""fedtrust.fairness."""
