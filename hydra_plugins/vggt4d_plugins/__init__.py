"""vggt4d's Hydra plugins: ``hydra/sweeper=vggt4d`` (every job checked before the first runs,
failed jobs named at the end) and ``hydra/launcher=slurm`` (submitit's Slurm launcher with
requests that fit the cluster and a wait that ends)."""
