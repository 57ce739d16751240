"""PrivImage's selection settings (``method.pretrain=selection``), checked for any method that
pretrains on the selection: privimage, or feta_privimage. Apart from :mod:`dpgen.methods.privimage`
so that validating a config does not import the module (Lightning, diffusers)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from dpgen.checks import is_number_in, require_int
from dpgen.data import has_public_data, validate_public_config
from dpgen.data.glyphs.config import CHARSETS
from dpgen.errors import ConfigError
from dpgen.models.classifiers import CLASSIFIERS

SELECTIONS = ("semantic", "all")


def check_selection_config(cfg: DictConfig) -> None:
    """The semantic query and selection of any method that pretrains on PrivImage's selection
    (``method.pretrain=selection``: privimage, or feta_privimage)."""
    m = cfg.method
    if not has_public_data(cfg.public):
        raise ConfigError("public", cfg.public.name, "method.pretrain=selection selects public classes to pretrain on",
                          "select a public set, e.g. public=glyphs")
    validate_public_config(cfg.public)
    for key in ("selection", "query_classifier"):
        if key not in m:
            raise ConfigError(f"method.{key}", None, "method.pretrain=selection needs PrivImage's query settings",
                              "use method=privimage or method=feta_privimage")
    if m.selection not in SELECTIONS:
        raise ConfigError("method.selection", m.selection, "unknown selection", f"use one of {', '.join(SELECTIONS)}")
    q = m.query_classifier
    if q.name not in CLASSIFIERS:
        raise ConfigError("method.query_classifier.name", q.name, "unknown classifier",
                          f"use one of {', '.join(CLASSIFIERS)}")
    require_int(q, "method.query_classifier", "epochs", minimum=1)
    require_int(q, "method.query_classifier", "batch_size", minimum=1)
    if q.get("num_threads") is not None:
        require_int(q, "method.query_classifier", "num_threads", minimum=1)
    if m.selection == "all":
        return
    public_classes = len(CHARSETS[cfg.public.charset])
    top_k = require_int(m, "method", "query_top_k", minimum=1)
    if top_k > public_classes:
        raise ConfigError("method.query_top_k", top_k, f"exceeds the {public_classes} public classes",
                          f"use at most {public_classes}")
    per_class = require_int(m, "method", "classes_per_label", minimum=1)
    if per_class * cfg.data.num_classes > public_classes:
        raise ConfigError("method.classes_per_label", per_class,
                          f"{cfg.data.num_classes} sensitive classes x {per_class} exceeds the {public_classes} "
                          "public classes (the selection is disjoint)",
                          f"use at most {public_classes // cfg.data.num_classes}, or a larger public.charset")
    sigma = m.get("query_sigma")
    if sigma is not None:
        if not is_number_in(sigma, 0, math.inf, low_open=True, high_open=True):
            raise ConfigError("method.query_sigma", sigma, "must be a noise multiplier > 0 or null",
                              "set e.g. method.query_sigma=20, or null to use method.query_budget_fraction")
    else:
        f = m.query_budget_fraction
        if not is_number_in(f, 0, 1, low_open=True, high_open=True):
            raise ConfigError("method.query_budget_fraction", f,
                              "must be in (0, 1): the query's share of privacy.eps, training gets the rest",
                              "set e.g. method.query_budget_fraction=0.1")
