"""fedtrust.server."""
