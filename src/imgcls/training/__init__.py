"""Training: the loop, schedules and resumable state."""
