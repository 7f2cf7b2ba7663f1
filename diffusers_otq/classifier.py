"""Deprecated alias of :mod:`diffusers_otq.evaluation.classifier`, where this module moved; import from there."""

from ._moved import alias


alias(__name__, "diffusers_otq.evaluation.classifier", globals())
