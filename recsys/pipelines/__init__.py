"""Glue: each pipeline reads the config, calls library functions and reports.

One module per CLI command; library code below never sees a config object.
"""
