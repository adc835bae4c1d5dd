"""Pure torch modules shared by training and the service: the MetaMMF fusion learner and backbones.

Import what you need from its module (``models.metammf_gcn``, ``models.registry``, ...): the package itself
imports nothing, so that light modules (``models.config``, ``models.registry``) load without torch.
"""
