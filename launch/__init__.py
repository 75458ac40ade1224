"""launch: grids of bip runs on Slurm, this machine, or in-process (grid.py), and the results index."""
