"""Variants of the real peer used only by tests (attackers, cheaters): never imported by potluck itself."""
