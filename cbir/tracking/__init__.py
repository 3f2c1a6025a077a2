"""MLflow: where runs are stored, one run per job, the sweep's parent run and callbacks, and what the
dashboard shows. Only the job's record step and the sweep callbacks write to it."""
