"""Analyses of pruning decisions: how much pruning criteria agree, and whether they can tell channels apart.

:func:`criteria_report` scores every channel group of a model with several criteria and
measures their rank agreement, the spread of their scores and the shape of the weight
distributions (after Huang et al., "Rethinking the Pruning Criteria for Convolutional
Neural Network", NeurIPS 2021); :func:`write_report` saves it as JSON, Markdown and a heat map.
"""

from __future__ import annotations

from prunekit.analyze import criteria as _criteria
from prunekit.analyze.criteria import *  # noqa: F403 - the analyses are this package's API

__all__ = list(_criteria.__all__)
