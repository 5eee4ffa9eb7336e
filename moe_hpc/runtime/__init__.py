"""A run from files to files: the engine (composes one rank's blocks and runs the wavefront
schedule), the assembly of its parts, the runner that streams chunks (with each dense rank's I/O thread), job and chunk arithmetic,
resume records, stop signals, progress, dry run.

May import: moe and everything below it. Not planner (sibling).
"""
