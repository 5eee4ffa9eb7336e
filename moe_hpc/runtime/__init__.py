"""A run from files to files: the engine (one rank's share of the model), the runner that
streams chunks, job and chunk arithmetic, resume records, stop signals, progress, dry run.

May import: moe and everything below it. Not planner (sibling).
"""
