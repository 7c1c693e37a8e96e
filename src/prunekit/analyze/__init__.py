"""Analyses of pruning decisions: how much pruning criteria agree, and whether they can tell channels apart.

:func:`criteria_report` scores every channel group of a model with several criteria and
measures their rank agreement, the spread of their scores and the shape of the weight
distributions (after Huang et al., "Rethinking the Pruning Criteria for Convolutional
Neural Network", NeurIPS 2021); :func:`write_report` saves it as JSON, Markdown and a heat map.
"""

from __future__ import annotations

from prunekit.analyze.criteria import (
    DATA_DRIVEN_DEFAULT,
    DATA_FREE_CRITERIA,
    CriteriaReport,
    Distinguishability,
    GroupAnalysis,
    LayerNormality,
    criteria_report,
    distinguishability,
    rank_correlations,
    weight_normality,
    write_report,
)

__all__ = [
    "DATA_DRIVEN_DEFAULT",
    "DATA_FREE_CRITERIA",
    "CriteriaReport",
    "Distinguishability",
    "GroupAnalysis",
    "LayerNormality",
    "criteria_report",
    "distinguishability",
    "rank_correlations",
    "weight_normality",
    "write_report",
]
