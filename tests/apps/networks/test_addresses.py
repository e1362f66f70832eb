"""Address arithmetic without the database: host ranges, lowest free addresses, MACs, default subnets."""

from apps.networks import addresses


def test_the_lowest_free_hosts_skip_the_network_broadcast_gateway_and_taken_ones() -> None:
    taken = ["10.0.0.2", "10.0.0.4"]
    assert addresses.lowest_free("10.0.0.0/29", "10.0.0.1", taken, 10) == ["10.0.0.3", "10.0.0.5", "10.0.0.6"]
    assert addresses.lowest_free("10.0.0.0/29", "10.0.0.6", [], 2) == ["10.0.0.1", "10.0.0.2"]
    assert addresses.host_count("10.0.0.0/29") == 5
    assert addresses.first_host("10.8.4.0/22") == "10.8.4.1"


def test_macs_are_distinct_lower_case_with_qemus_prefix_and_avoid_what_is_taken() -> None:
    macs = addresses.random_macs(2000)
    assert len(set(macs)) == 2000
    assert all(mac.startswith("52:54:00:") and mac == mac.lower() and len(mac) == 17 for mac in macs)
    assert not set(addresses.random_macs(100, avoid=set(macs))) & set(macs)


def test_a_default_subnet_avoids_what_the_project_reaches_and_prefers_what_nobody_uses() -> None:
    assert addresses.free_default_subnet([]) == "10.0.0.0/24"
    assert addresses.free_default_subnet(["10.0.0.0/23", "192.168.0.0/16"]) == "10.0.2.0/24"
    assert addresses.free_default_subnet(["10.0.0.0/24"], ["10.0.1.0/24"]) == "10.0.2.0/24"
    assert addresses.free_default_subnet(["10.0.0.0/8"]) is None
    # Every /24 used elsewhere: one that only other projects use will do.
    assert addresses.free_default_subnet(["10.0.0.0/24"], ["10.0.0.0/8"]) == "10.0.1.0/24"


def test_overlaps_are_found_both_ways() -> None:
    assert addresses.overlapping("10.0.0.0/24", ["10.0.0.128/25", "10.0.1.0/24", "10.0.0.0/16"]) == [
        "10.0.0.128/25",
        "10.0.0.0/16",
    ]
