"""What a cluster can hold, now and grown by its autoscaler (`apollo_ray.launch.capacity`): a study
on an autoscaling cluster that starts with the head alone is not refused for lack of GPUs, and a
trial that no growth can hold is refused naming the node types. (On a real local Ray, which
has no autoscaler: tests/commands/test_tune.py.)"""

from apollo_ray.launch.capacity import fits_now, from_config, shortfall, workers_that_fit

# cluster/gpu.yaml as `ray up` resolves it: each type's resources filled from its instance type
RESOLVED = {
    "max_workers": 4,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 16}, "node_config": {}},
        "gpu_worker": {"min_workers": 0, "max_workers": 4, "resources": {"CPU": 192, "GPU": 8}},
    },
}
HEAD_ONLY = {"CPU": 16.0}
GPU = {"CPU": 8, "GPU": 1}


def test_node_types_of_a_resolved_cluster_file():
    types = {t.name: (t.resources, t.max_count) for t in from_config(RESOLVED)}
    assert types == {"head": ({"CPU": 16}, 1), "gpu_worker": ({"CPU": 192, "GPU": 8}, 4)}
    capped = from_config({**RESOLVED, "max_workers": 2})
    assert [t.max_count for t in capped] == [1, 2]


def test_a_gpu_trial_on_the_head_alone_waits_for_the_autoscaler():
    types = from_config(RESOLVED)
    assert not fits_now(GPU, 8, HEAD_ONLY, driver_cpu=0.1)
    assert shortfall(GPU, 8, HEAD_ONLY, types, driver_cpu=0.1) is None  # one p5 node
    assert shortfall(GPU, 32, HEAD_ONLY, types) is None  # all four
    assert workers_that_fit(GPU, {"CPU": 192, "GPU": 8}) == 8


def test_a_trial_no_growth_can_hold_is_refused_naming_the_node_types():
    types = from_config(RESOLVED)
    too_many = shortfall(GPU, 33, HEAD_ONLY, types)
    assert too_many is not None and "at most 32" in too_many and "gpu_worker (up to 4)" in too_many
    too_big = shortfall({"CPU": 1, "GPU": 16}, 1, HEAD_ONLY, types)
    assert too_big is not None and "more than any node type" in too_big
    assert "head (up to 1): 16 CPU" in too_big and "gpu_worker (up to 4): 192 CPU, 8 GPU" in too_big


def test_a_fixed_cluster_is_read_as_it_is():
    assert shortfall({"CPU": 1}, 2, {"CPU": 2.5}, None, driver_cpu=0.1) is None
    message = shortfall(GPU, 1, HEAD_ONLY, None, driver_cpu=0.1)
    assert message == (
        "a trial needs 1 GPU (1 workers and its driver) but the Ray cluster has 0, and no "
        "autoscaler to add nodes"
    )


def test_strict_pack_needs_one_node_that_holds_the_whole_trial():
    types = from_config(RESOLVED)
    assert shortfall(GPU, 8, HEAD_ONLY, types, one_node=True) is None
    message = shortfall(GPU, 16, HEAD_ONLY, types, one_node=True)
    assert message is not None and message.startswith("placement STRICT_PACK puts all 16")
