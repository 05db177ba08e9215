"""harness/environment.py: the library versions recorded with every trial."""

from __future__ import annotations

import platform

import numpy
import PIL
import pytest
import timm
import torch
import torchvision

from harness import environment
from harness.environment import ABSENT, ENV_TAG, LIB_PREFIX, env_hash, environment_tags, versions_text


def test_env_hash_is_sha1_of_sorted_lines_without_bookkeeping():
    # printf 'numpy=2.4.6\ntorch=2.14.1' | sha1sum -> 36421bf57f8a64b6125f764511a2e04e1aa3c573;
    # the mapping's order and the mlflow version (bookkeeping) do not enter it.
    assert env_hash({"torch": "2.14.1", "numpy": "2.4.6"}) == "36421bf57f8a"
    assert env_hash({"numpy": "2.4.6", "mlflow": "3.17.2", "torch": "2.14.1"}) == "36421bf57f8a"
    # one result-deciding version changes it: printf 'numpy=2.4.6\ntorch=2.14.2' | sha1sum -> 316a07f0f00f...
    assert env_hash({"torch": "2.14.2", "numpy": "2.4.6"}) == "316a07f0f00f"
    # Python counts by its minor version: printf 'python=3.11\ntorch=2.14.1' | sha1sum -> 72826dfd3d10...
    assert env_hash({"torch": "2.14.1", "python": "3.11.7"}) == env_hash({"torch": "2.14.1", "python": "3.11.2"}) == "72826dfd3d10"
    assert env_hash({"torch": "2.14.1", "python": "3.12.1"}) != "72826dfd3d10"


def test_environment_tags_name_this_install():
    tags = environment_tags("cpu")
    assert tags[LIB_PREFIX + "torch"] == torch.__version__
    assert tags[LIB_PREFIX + "torchvision"] == torchvision.__version__  # with the build: 0.29.1+cu130
    assert tags[LIB_PREFIX + "timm"] == timm.__version__
    assert tags[LIB_PREFIX + "numpy"] == numpy.__version__
    assert tags[LIB_PREFIX + "pillow"] == PIL.__version__
    assert tags[LIB_PREFIX + "python"] == platform.python_version()
    for name in environment.RESULT_LIBRARIES + environment.BOOKKEEPING_LIBRARIES:
        assert tags[LIB_PREFIX + name] not in ("", ABSENT), name  # every one is a dependency of the package
    # on a CPU the CUDA libraries compute nothing: not recorded, not hashed
    assert LIB_PREFIX + "cuda" not in tags and LIB_PREFIX + "cudnn" not in tags
    versions = {k[len(LIB_PREFIX):]: v for k, v in tags.items() if k.startswith(LIB_PREFIX)}
    assert tags[ENV_TAG] == env_hash(versions)
    assert all(len(v) <= 5000 for v in tags.values())  # MLflow's tag value limit


def test_cuda_device_records_cuda_and_cudnn_in_the_hash(monkeypatch):
    monkeypatch.setattr(environment, "cuda_versions", lambda: {"cuda": "13.0", "cudnn": "91200"})
    cpu, gpu = environment_tags("cpu"), environment_tags("cuda:1")
    assert (gpu[LIB_PREFIX + "cuda"], gpu[LIB_PREFIX + "cudnn"]) == ("13.0", "91200")
    assert gpu[ENV_TAG] != cpu[ENV_TAG]


def test_cpu_thread_count_is_recorded_and_hashed():
    # Another intra-op thread count splits float sums differently: other numbers, another env.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = environment_tags("cpu")
        torch.set_num_threads(2)
        two = environment_tags("cpu")
    finally:
        torch.set_num_threads(before)
    assert (one[LIB_PREFIX + "cpu_threads"], two[LIB_PREFIX + "cpu_threads"]) == ("1", "2")
    assert one[ENV_TAG] != two[ENV_TAG]
    assert LIB_PREFIX + "cpu_threads" not in environment_tags("cuda:0")  # a GPU trial's sums run on the GPU
    assert versions_text(two).endswith("cpu_threads 2")


def test_missing_distribution_is_absent():
    assert environment.distribution_version("no-such-distribution-wsss") == ABSENT


def test_versions_text_orders_libraries_and_reads_old_tags():
    tags = {LIB_PREFIX + "python": "3.11.7", LIB_PREFIX + "numpy": "2.4.6", LIB_PREFIX + "torch": "2.14.1",
            LIB_PREFIX + "mlflow": "3.17.2", "wsss.torch": "2.14.1", ENV_TAG: "x"}
    assert versions_text(tags) == "torch 2.14.1, numpy 2.4.6, python 3.11.7"
    # runs recorded before the wsss.lib.* tags had only these two
    assert versions_text({"wsss.torch": "2.4.0", "wsss.timm": "1.0.9"}) == "torch 2.4.0, timm 1.0.9"
    assert versions_text({}) == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_versions_on_a_gpu():
    tags = environment_tags("cuda")
    assert tags[LIB_PREFIX + "cuda"] == torch.version.cuda
    assert tags[LIB_PREFIX + "cudnn"] == str(torch.backends.cudnn.version())


def test_every_trial_run_carries_the_environment_tags(tmp_path):
    """A trial's MLflow run holds the versions it ran with (harness/tracking.py)."""
    from mlflow.tracking import MlflowClient

    from harness.config import TrialSpec
    from harness.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(tmp_path)
    spec = TrialSpec(suite="env-test", method="cam", method_config={"epochs": 1}, dataset="synthetic", data_root=None,
                     dataset_options={}, splits={}, eval={}, seed=0)
    run_id = Tracker(uri, spec.suite).open_trial_run(spec, None, "cpu")
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith(LIB_PREFIX) or k == ENV_TAG} == environment_tags("cpu")
