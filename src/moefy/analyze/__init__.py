"""Routing analysis: which experts each domain uses, per layer, as numbers, plots and a report."""
