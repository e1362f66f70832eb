"""``bench.migration.run``'s command line: ``--netns`` keeps a second bench's namespaces apart."""

import argparse

import pytest

from bench.migration.run import namespaces


def test_a_prefix_and_octet_are_taken_as_given():
    assert namespaces("ncet:236") == "ncet:236"


@pytest.mark.parametrize("text", ["ncet", "ncet:", ":236", "ncet:300", "ncet:x", "a-very-long-prefix:236"])
def test_a_malformed_netns_is_refused_with_the_expected_form(text: str):
    with pytest.raises(argparse.ArgumentTypeError, match="PREFIX:OCTET"):
        namespaces(text)
