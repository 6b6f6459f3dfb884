"""Evaluation: frozen metric nets, metric math, methods (baselines and model ablations), reports."""
