"""The α/rank study (issue 18, part 2): α versus learning rate, and α/r versus α/√r (docs/results/alpha-lr.md)."""
