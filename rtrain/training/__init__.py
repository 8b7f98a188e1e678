"""Training: the Ray Train trainer and worker loop, the step engine, EMA, optimiser, schedule, guards."""
