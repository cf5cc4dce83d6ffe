"""The system underneath: user errors and number checks, crash-safe output files and their locks, where a run
computes (device, precision, processes, rank-0 printing, seeding), and the NVIDIA driver as the machine reports it.

May import: nothing else of the project.
"""
