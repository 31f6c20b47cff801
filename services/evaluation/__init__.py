"""Evaluation of generation quality over labelled queries."""
