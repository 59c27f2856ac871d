"""Picasso (Cai et al.): concept neurons per timestep, clustered into fuzzy sub-concepts."""
