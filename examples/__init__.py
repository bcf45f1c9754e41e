"""Runnable potluck tasks with their run.toml files."""
