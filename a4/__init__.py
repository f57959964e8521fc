"""Support code for the COMP 565 assignment-4 solution: safe data loading, the clustering
metric's fast path, sparse kernels, likelihoods and all-or-nothing output writing."""
