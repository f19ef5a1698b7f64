"""Studies: orchestration of many runs (plan and compare: one recipe, several methods and seeds, one table)."""
