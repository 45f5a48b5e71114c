"""Analyses on the graph: the kernels that run (schedule), stream assignment, memory planning."""
