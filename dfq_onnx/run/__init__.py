"""The run machinery: units, the weight reader, the prior, planning, checkpoints, Ray, the budget,
verification and the loop that strings them together."""
