"""lozo-exp's Hydra launcher: `hydra/launcher=gpus_local` (see `gpus_local`)."""
