"""Evaluation as lm-evaluation-harness defines it: tasks, scoring, metrics."""
