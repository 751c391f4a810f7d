"""Training: the one loop (loop) and the small helpers it calls (resume, keep_best, qat,
distributed), the tasks that say how to read a model's outputs (tasks), and evaluation."""
