"""Reporting: plots of training logs."""
