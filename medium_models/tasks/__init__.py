"""One module per task, each exposing `TASK` (a `medium_models.tasks.base.PromptTask`)."""
