"""The reporting half: inspect, status, diff and their HTML/plots."""
