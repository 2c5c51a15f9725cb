"""The shared core of both trainers: the distillation objective, (alpha, beta) schedules,
numerical checks, the collapse guard, DeepSpeed plumbing, output directories, Hub checks and
the model card's distillation section. Nothing here depends on the LM or classifier trainers."""
