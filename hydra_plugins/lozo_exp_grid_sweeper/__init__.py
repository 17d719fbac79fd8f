"""lozo-exp's Hydra sweeper plugin (`hydra/sweeper=grids`), found by Hydra's plugin discovery."""
