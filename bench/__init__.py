"""Benchmarks and the instruments they share (see README, Performance)."""
