"""The study's published artifacts: their formats (split CSVs, HDF5 embeddings), export to them, and
parity of cbir's embeddings with them."""
