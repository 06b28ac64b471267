"""Task distributions, data sets and the Parquet episode store."""
