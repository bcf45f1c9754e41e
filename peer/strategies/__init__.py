"""Averaging strategies: how the swarm combines the work that peer/loop.py does (one module each)."""
