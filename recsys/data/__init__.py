"""Data in: the MIND reader, cover images and the sample-world generator."""
