"""failover.Failover.follows: the removal guard's question (inbox.guards_removals), over real
sessions like test_failover.py."""
from __future__ import absolute_import, division, print_function

from test_failover import cluster, peer, run_until  # noqa: F401 (fixture)


def test_only_a_follower_follows_and_only_the_leader_of_the_highest_term(cluster):  # noqa: F811
    (alpha, beta, gamma), clock, _ = cluster
    run_until(cluster[0], clock, lambda: alpha.is_acting() and beta.leader_name() == "alpha")
    assert beta.follows(peer(beta, "alpha")) and not beta.follows(peer(beta, "gamma"))
    assert not alpha.follows(peer(alpha, "beta"))   # it acts
    # master-owned files from gamma in a higher term: gamma leads it (fencing), alpha no more
    beta.check_transfer(peer(beta, "gamma"), {"term": 2, "version": [2, 0]})
    assert beta.follows(peer(beta, "gamma")) and not beta.follows(peer(beta, "alpha"))
