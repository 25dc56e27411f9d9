"""Helpers shared by several passes (never passes themselves): QDQ arithmetic, range observers, factorization."""
