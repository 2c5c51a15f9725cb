"""Tools built on the trainers: the (alpha, beta) sweep, divergence comparisons, the
mass-allocation picture and the run report."""
