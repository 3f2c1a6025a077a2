"""What a person reads: a job's summary table and files, `python -m cbir.report` tables from MLflow
runs, the comparison page, figures and the retrieval gallery."""
