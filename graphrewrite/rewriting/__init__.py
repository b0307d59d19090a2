"""The rewriting half: scan, load, inline, match, plan, build, save, verify, export."""
