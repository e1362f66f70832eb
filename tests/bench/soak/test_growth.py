"""bench.soak: each end of the RSS growth check is a median, so one migration in flight is not growth."""

from bench.soak.__main__ import _median_rss


def test_one_sample_holding_a_migration_in_flight_does_not_move_the_median() -> None:
    samples = [{"node": 130, "web": 80}, {"node": 175, "web": 81}, {"node": 132, "web": 80}]
    assert _median_rss(samples) == {"node": 132, "web": 80}


def test_a_process_missing_from_a_sample_counts_as_zero_there() -> None:
    assert _median_rss([{"node": 10}, {"node": 12}, {}]) == {"node": 10}
