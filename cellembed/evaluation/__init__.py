"""Scores of an embedding: the assignment's exact metric, the leaderboard's metrics, scoring while training.

The assignment's graph (kept here, light to import, for the command lines' defaults):
"""

N_NEIGHBORS = 30  # the assignment's kNN size
RESOLUTION = 0.15  # the assignment's Louvain resolution
