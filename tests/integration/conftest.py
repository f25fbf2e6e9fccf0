"""One in-process local Ray cluster for the integration tests, bound to 127.0.0.1.

Started on first use and again after a module that needed its own cluster (the multi-node
federated tests) shut it down; stopped at the end of the session.
"""

import pytest

from tests.integration import local_processes


@pytest.fixture(scope="module")
def ray_cluster(request):
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: Train workers and Serve replicas ask for fractions.
        # Without the dashboard Ray still starts a stub on dashboard_port (8265 by default), which
        # Ray Train's placement-group cleaner asks whether the run's controller lives: another
        # local cluster's dashboard on 8265 answers "no such actor" and the cleaner removes this
        # run's placement group. A free port keeps the stub this cluster's own.
        with local_processes.own_agent_port():
            ray.init(
                # "local": a new cluster, never one that a `ray start` elsewhere on the machine (another
                # test module, another pytest worker) left its address for in /tmp/ray.
                address="local",
                num_cpus=4,
                include_dashboard=False,
                dashboard_port=local_processes.free_port(),
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
            )
        request.session.addfinalizer(ray.shutdown)
    return ray
