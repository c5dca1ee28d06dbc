"""Per-device kernels, one folder per algorithm, one file per backend (installed as shardattn.kernels)."""
