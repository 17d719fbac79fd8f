"""One module per task, each exposing `TASK` (a `large_models.tasks.base.CausalTask`)."""
