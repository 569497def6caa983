"""Ray (optional extra): connecting, the fit on a cluster, batch scoring into Parquet."""
