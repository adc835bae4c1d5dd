"""Pure torch modules shared by training and the service: the MetaMMF fusion learner and backbones."""

from models.base import RecModel
from models.config import ModelConfig
from models.fusion import MetaFusionLayer, MetaFusionNetwork
from models.metammf_gcn import MetaMMF_GCN
from models.metammf_mf import MetaMMF_MF

__all__ = ["MetaFusionLayer", "MetaFusionNetwork", "MetaMMF_GCN", "MetaMMF_MF", "ModelConfig", "RecModel"]
