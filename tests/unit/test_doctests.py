"""Docstring examples are part of the documentation: they must run."""

import doctest
import importlib

import pytest

MODULES = ["fedsilo.registry", "fedsilo.config", "fedsilo.aggregate", "fedsilo.metrics",
           "fedsilo.partition", "fedsilo.shards.hdf5", "data_prep.synthetic",
           "fedsilo.privacy.accounting", "fedsilo.privacy.budget", "fedsilo.privacy.validate",
           "fedsilo.privacy.userlevel", "fedsilo.crypto.params", "fedsilo.grouping",
           "data_prep.plan", "data_prep.dicom", "fedsilo.privacy.secret",
           "fedsilo.privacy.user_accounting", "fedsilo.crypto.masks", "fedsilo.crypto.identity"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
