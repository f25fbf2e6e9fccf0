"""One in-process local Ray cluster for the integration tests, bound to 127.0.0.1.

Started on first use and again after a module that needed its own cluster (the multi-node
federated tests) shut it down; stopped at the end of the session.
"""

import pytest


@pytest.fixture(scope="module")
def ray_cluster(request):
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: Train workers and Serve replicas ask for fractions.
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}},
        )
        request.session.addfinalizer(ray.shutdown)
    return ray
