"""Evaluations of a job's embeddings (retrieval, saturation, multi-label, k-NN, probe, text, audit),
each behind one interface (`cbir.evaluate.base`), and the metric, interval and index code they use."""
