"""Evaluation: loss and multiple-choice accuracy, sharded over ranks, and the models moelora-eval loads."""
