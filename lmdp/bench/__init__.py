"""`lmdp bench`: speed on real shapes against the HBM roofline and transformers (run on a GPU)."""
