import pytest

from nl_rewrite.errors import SiteError
from nl_rewrite.model.sites import SITE_HOOKS, Site, mlp_in, mlp_out, resolve


def test_parse_both_spellings():
    assert Site.parse("mlp_out.6") == Site.parse("mlp_out(6)") == mlp_out(6)
    assert mlp_in(1).hook_name == "blocks.1.mlp.hook_in"


def test_every_site_kind_exists_on_the_bridge(tiny):
    for kind in SITE_HOOKS:
        assert resolve(tiny, Site(kind, 1)) in tiny.hook_dict


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(SiteError, match="mlp_in, mlp_out"):
        Site.parse("mlp_middle.3")


def test_unparseable_site():
    with pytest.raises(SiteError, match="cannot parse"):
        Site.parse("layer six")


def test_layer_out_of_range_names_valid_range(tiny):
    with pytest.raises(SiteError, match=r"valid: 0\.\.1"):
        resolve(tiny, "mlp_out.7")
