"""Deprecated alias of :mod:`diffusers_otq.evaluation.datasets`, where this module moved; import from there."""

from ._moved import alias


alias(__name__, "diffusers_otq.evaluation.datasets", globals())
