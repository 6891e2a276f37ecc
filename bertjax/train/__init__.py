"""Training: losses, optimizer, the pure steps, checkpoints, preemption, joining a job, the loop."""
