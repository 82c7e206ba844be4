"""fedtrust.clients."""
