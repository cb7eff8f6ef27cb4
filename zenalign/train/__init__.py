"""Running a training job: the trainer loop, building a run's parts, the run state, checkpoints,
the engines that run the update (torch, DeepSpeed), distributed plumbing and the run directory."""
