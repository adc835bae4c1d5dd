"""Models shared by training and the service.

- ``models/metammf/``: MetaMMF (item-specific fusion under an MF, GraphSAGE or LightGCN backbone) and what the
  service needs of it for new items and users; the models the service can serve.
- ``models/baselines/``: the baselines and static-fusion variants of the paper's tables (trained, not served).
- ``models/graph/``: graph plumbing both use (the user-item graph, sparse products, edge kernels, sampling).
- ``base.py`` (the contract), ``config.py`` (one config class per model), ``registry.py`` (name -> class,
  config class and capabilities), ``artifacts.py`` (the artifact format), ``hardware.py``.

Import what you need from its module (``models.metammf.gcn``, ``models.registry``, ...): the package itself
imports nothing, so that light modules (``models.config``, ``models.registry``) load without torch.
"""
