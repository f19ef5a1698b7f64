"""Studies: orchestration of many runs (compare: one recipe, several methods and seeds, one table)."""
