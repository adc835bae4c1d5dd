"""Graph plumbing shared by MetaMMF and the baselines: sparse products, edge kernels, neighbour sampling."""
