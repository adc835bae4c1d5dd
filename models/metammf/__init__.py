"""MetaMMF: item-specific multimodal fusion (fusion.py) under an MF, GraphSAGE or LightGCN backbone, and
what the service needs of it (inference.py: new items and users). The only models the service serves."""
