"""The baselines of the paper's tables (and the static-fusion variants of MetaMMF), behind the same contract
(models.base.RecModel): trained and evaluated, not served."""
