"""Privacy attacks: membership inference (scores, attacks, metrics) and canaries."""
